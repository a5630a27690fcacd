/* C implementation of ws_monitoring's per-frame counting (see core.py).
 *
 * Why C: the counter runs twice per echoed message, inside websockets' parser and
 * serializer. In Python it costs about 2 µs of a 23 µs echo; here about a tenth of it.
 * The pure-Python implementation in core.py stays the reference and the fallback: both
 * are tested against the same suite (WS_MONITORING_NO_SPEEDUPS=1 selects Python).
 *
 * Counts: a base class of ConnectionRecord holding its counters as C fields, read by
 * the metrics collector as plain attributes. The record itself is the frame counter:
 * websockets calls its decode()/encode() as it does an extension's. Rare frames
 * (ping, pong, close) are handed back to Python methods of the record.
 *
 * Thread safety: every method runs with the GIL held, and each record is written from
 * one serialized context (the event loop, or the connection's protocol mutex).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

static PyObject *op_text, *op_binary, *op_cont, *op_ping, *op_pong, *op_close;
static PyObject *str_opcode, *str_data, *str_fin, *str_rsv1, *str_rsv2, *str_rsv3;
static PyObject *str_pong, *str_ping, *str_close_frame, *str_message_done, *str_message_handed;
static PyObject *str_throw, *str_close, *str_message_started, *str_message_finished;

/* -- Layout: the histogram layout and bucket bounds shared by a monitor's records -- */

typedef struct {
    PyObject_HEAD
    PyObject *table_obj;          /* bytes: bucket index of each small size */
    const unsigned char *table;
    Py_ssize_t n_table;
    double *size_bounds;
    Py_ssize_t n_size;
    double *duration_bounds;
    Py_ssize_t n_duration;
    double *rtt_bounds;
    Py_ssize_t n_rtt;
    Py_ssize_t off_out, off_duration, off_rtt, length;
    PyObject *on_sent;            /* callable(record, binary, size) or NULL */
    int message_sinks;            /* do sinks want message_handed/message_done calls? */
    PyObject *message_sink;       /* the only message sink: called from here, or NULL */
    double keep_threshold;        /* its keep_threshold (see NOT_SAMPLED); < 0: none */
    PyObject *sink_failed;        /* callable(sink, method, exc): logs a sink's error */
    PyObject *not_sampled;        /* the NOT_SAMPLED sentinel */
} LayoutObject;

static int
read_bounds(PyObject *layout, const char *name, double **out, Py_ssize_t *n)
{
    PyObject *seq = PyObject_GetAttrString(layout, name);
    if (seq == NULL) return -1;
    PyObject *fast = PySequence_Fast(seq, "bounds must be a sequence");
    Py_DECREF(seq);
    if (fast == NULL) return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    if (len < 1) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: at least one bucket bound is needed", name);
        return -1;
    }
    double *values = PyMem_New(double, len);
    if (values == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        values[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (values[i] == -1.0 && PyErr_Occurred()) {
            PyMem_Free(values);
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    *out = values;
    *n = len;
    return 0;
}

static Py_ssize_t
read_offset(PyObject *layout, const char *name)
{
    PyObject *value = PyObject_GetAttrString(layout, name);
    if (value == NULL) return -1;
    Py_ssize_t result = PyNumber_AsSsize_t(value, PyExc_OverflowError);
    Py_DECREF(value);
    return result;
}

static int
Layout_init(LayoutObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"layout", "size_table", "on_sent", "message_sinks", "message_sink",
                             "keep_threshold", "sink_failed", "not_sampled", NULL};
    PyObject *layout, *table, *on_sent;
    PyObject *message_sink = Py_None, *keep = Py_None, *sink_failed = Py_None;
    PyObject *not_sampled = Py_None;
    int message_sinks = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OSO|p$OOOO:Layout", kwlist, &layout, &table,
                                     &on_sent, &message_sinks, &message_sink, &keep,
                                     &sink_failed, &not_sampled))
        return -1;
    if (message_sink != Py_None && (!PyCallable_Check(sink_failed) || not_sampled == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "a message_sink needs sink_failed and not_sampled");
        return -1;
    }
    self->keep_threshold = -1.0;
    if (keep != Py_None) {
        self->keep_threshold = PyFloat_AsDouble(keep);
        if (self->keep_threshold == -1.0 && PyErr_Occurred()) return -1;
        if (self->keep_threshold < 0) self->keep_threshold = 0.0;
    }
    if (self->table_obj != NULL) {
        PyErr_SetString(PyExc_TypeError, "Layout is already initialized");
        return -1;
    }
    if (read_bounds(layout, "size_bounds", &self->size_bounds, &self->n_size) < 0 ||
        read_bounds(layout, "duration_bounds", &self->duration_bounds, &self->n_duration) < 0 ||
        read_bounds(layout, "rtt_bounds", &self->rtt_bounds, &self->n_rtt) < 0)
        return -1;
    self->off_out = read_offset(layout, "size_out");
    self->off_duration = read_offset(layout, "duration");
    self->off_rtt = read_offset(layout, "rtt");
    self->length = read_offset(layout, "length");
    if (PyErr_Occurred()) return -1;
    if (self->off_out != self->n_size + 1 ||
        self->off_duration != 2 * (self->n_size + 1) ||
        self->off_rtt != self->off_duration + self->n_duration + 1 ||
        self->length != self->off_rtt + self->n_rtt + 1) {
        PyErr_SetString(PyExc_ValueError, "histogram offsets do not match the bounds");
        return -1;
    }
    self->message_sinks = message_sinks;
    if (message_sink != Py_None) {
        self->message_sink = Py_NewRef(message_sink);
        self->sink_failed = Py_NewRef(sink_failed);
        self->not_sampled = Py_NewRef(not_sampled);
    }
    Py_INCREF(table);
    self->table_obj = table;
    self->table = (const unsigned char *)PyBytes_AS_STRING(table);
    self->n_table = PyBytes_GET_SIZE(table);
    for (Py_ssize_t i = 0; i < self->n_table; i++) {
        if (self->table[i] > self->n_size) {
            PyErr_SetString(PyExc_ValueError, "size table entry out of range");
            return -1;
        }
    }
    if (on_sent != Py_None) {
        if (!PyCallable_Check(on_sent)) {
            PyErr_SetString(PyExc_TypeError, "on_sent must be callable or None");
            return -1;
        }
        Py_INCREF(on_sent);
        self->on_sent = on_sent;
    }
    return 0;
}

/* A layout refers to its monitor (on_sent is a bound method of it), which refers to it. */
static int
Layout_traverse(LayoutObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_sent);
    Py_VISIT(self->message_sink);
    Py_VISIT(self->sink_failed);
    Py_VISIT(self->not_sampled);
    return 0;
}

static int
Layout_clear(LayoutObject *self)
{
    Py_CLEAR(self->on_sent);
    Py_CLEAR(self->message_sink);
    Py_CLEAR(self->sink_failed);
    Py_CLEAR(self->not_sampled);
    return 0;
}

static void
Layout_dealloc(LayoutObject *self)
{
    PyObject_GC_UnTrack(self);
    Layout_clear(self);
    Py_XDECREF(self->table_obj);
    PyMem_Free(self->size_bounds);
    PyMem_Free(self->duration_bounds);
    PyMem_Free(self->rtt_bounds);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject LayoutType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ws_monitoring._speedups.Layout",
    .tp_doc = PyDoc_STR("Layout(layout, size_table, on_sent, message_sinks=False, *, "
                        "message_sink=None, keep_threshold=None, sink_failed=None, "
                        "not_sampled=None): bucket bounds and offsets, and the sinks."),
    .tp_basicsize = sizeof(LayoutObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Layout_traverse,
    .tp_clear = (inquiry)Layout_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Layout_init,
    .tp_dealloc = (destructor)Layout_dealloc,
};

/* -- Counts ----------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    LayoutObject *layout;
    unsigned long long *h;        /* per-bucket counts, allocated on first use */
    long long in_text, in_binary, out_text, out_binary, in_bytes, out_bytes;
    double handling_sum, rtt_sum;
    double handling_start;        /* perf_counter() when the handler got its message, or 0 */
    /* ConnectionRecord's timestamps: C doubles, not a float object each (memory). */
    double opened_at, opened_unix, closed_at, ping_sent_at;
    Py_ssize_t in_size, out_size; /* bytes so far of a fragmented message */
    PyObject *tokens;             /* what message_started returned (see core.py) */
    long long sample_skip;        /* messages still NOT_SAMPLED without a call */
    PyObject *exemplar_trace_id;  /* set by a tracing sink for a kept span */
    PyObject *timed;              /* the last timed() awaitable: reused once it is done */
    char in_op_binary, out_op_binary, fragmented, token_deferred;
} CountsObject;

/* bisect_left(bounds, x): the first index whose bound is >= x (n when none is). */
static inline Py_ssize_t
bisect_left(const double *bounds, Py_ssize_t n, double x)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (bounds[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static inline unsigned long long *
histogram(CountsObject *self)
{
    if (self->h == NULL) {
        self->h = PyMem_Calloc((size_t)self->layout->length, sizeof(unsigned long long));
        if (self->h == NULL) PyErr_NoMemory();
    }
    return self->h;
}

static inline Py_ssize_t
size_bucket(LayoutObject *layout, Py_ssize_t size)
{
    if (size < layout->n_table) return layout->table[size];
    return bisect_left(layout->size_bounds, layout->n_size, (double)size);
}

static int
Counts_init(CountsObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *layout;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Counts() takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O!:Counts", &LayoutType, &layout)) return -1;
    Py_INCREF(layout);
    Py_XSETREF(self->layout, (LayoutObject *)layout);
    return 0;
}

static int
Counts_traverse(CountsObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->layout);
    Py_VISIT(self->tokens);
    Py_VISIT(self->exemplar_trace_id);
    Py_VISIT(self->timed);
    return 0;
}

static int
Counts_clear(CountsObject *self)
{
    Py_CLEAR(self->tokens);
    Py_CLEAR(self->exemplar_trace_id);
    Py_CLEAR(self->timed);
    return 0;
}

static void
Counts_dealloc(CountsObject *self)
{
    PyObject_GC_UnTrack(self);
    Counts_clear(self);
    Py_CLEAR(self->layout);
    PyMem_Free(self->h);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Is any of rsv1, rsv2, rsv3 set? -1 on error. */
static int
reserved_bits(PyObject *frame)
{
    PyObject *names[3] = {str_rsv1, str_rsv2, str_rsv3};
    for (int i = 0; i < 3; i++) {
        PyObject *value = PyObject_GetAttr(frame, names[i]);
        if (value == NULL) return -1;
        int set = PyObject_IsTrue(value);
        Py_DECREF(value);
        if (set) return set;
    }
    return 0;
}

/* (fin, len(data)) of a frame; -1 on error. */
static int
fin_and_size(PyObject *frame, int *fin, Py_ssize_t *size)
{
    PyObject *value = PyObject_GetAttr(frame, str_fin);
    if (value == NULL) return -1;
    *fin = PyObject_IsTrue(value);
    Py_DECREF(value);
    if (*fin < 0) return -1;
    value = PyObject_GetAttr(frame, str_data);
    if (value == NULL) return -1;
    *size = PyObject_Size(value);
    Py_DECREF(value);
    return *size < 0 ? -1 : 0;
}

static PyObject *
call_back(CountsObject *self, PyObject *name, PyObject *frame)
{
    PyObject *result = PyObject_CallMethodOneArg((PyObject *)self, name, frame);
    if (result == NULL) return NULL;
    Py_DECREF(result);
    return Py_NewRef(frame);
}

/* decode(frame, *, max_size=None): count a frame websockets parsed; returns it. */
static PyObject *
Counts_decode(CountsObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "decode() takes one positional argument");
        return NULL;
    }
    PyObject *frame = args[0];
    PyObject *op = PyObject_GetAttr(frame, str_opcode);
    if (op == NULL) return NULL;
    Py_DECREF(op); /* the Opcode members live as long as websockets.frames */
    int fin, rsv;
    Py_ssize_t size;
    int binary;
    if (op == op_text || op == op_binary) {
        if (self->fragmented) return Py_NewRef(frame);
        if ((rsv = reserved_bits(frame)) != 0) return rsv < 0 ? NULL : Py_NewRef(frame);
        if (fin_and_size(frame, &fin, &size) < 0) return NULL;
        binary = op == op_binary;
        if (!fin) {
            self->fragmented = 1;
            self->in_op_binary = (char)binary;
            self->in_size = size;
            return Py_NewRef(frame);
        }
    }
    else if (op == op_cont) {
        if (!self->fragmented) return Py_NewRef(frame);
        if ((rsv = reserved_bits(frame)) != 0) return rsv < 0 ? NULL : Py_NewRef(frame);
        if (fin_and_size(frame, &fin, &size) < 0) return NULL;
        size += self->in_size;
        if (!fin) {
            self->in_size = size;
            return Py_NewRef(frame);
        }
        self->fragmented = 0;
        binary = self->in_op_binary;
    }
    else if (op == op_pong || op == op_close) {
        /* Control frames websockets rejects are not reported. */
        if ((rsv = reserved_bits(frame)) != 0) return rsv < 0 ? NULL : Py_NewRef(frame);
        if (fin_and_size(frame, &fin, &size) < 0) return NULL;
        if (!fin || size > 125) return Py_NewRef(frame);
        return call_back(self, op == op_pong ? str_pong : str_close_frame, frame);
    }
    else {
        return Py_NewRef(frame);
    }
    unsigned long long *h = histogram(self);
    if (h == NULL) return NULL;
    if (binary) self->in_binary++;
    else self->in_text++;
    self->in_bytes += size;
    h[size_bucket(self->layout, size)]++;
    return Py_NewRef(frame);
}

/* encode(frame): count a frame websockets is about to serialize; returns it. */
static PyObject *
Counts_encode(CountsObject *self, PyObject *frame)
{
    PyObject *op = PyObject_GetAttr(frame, str_opcode);
    if (op == NULL) return NULL;
    Py_DECREF(op);
    int fin, binary;
    Py_ssize_t size;
    if (op == op_text || op == op_binary) {
        if (fin_and_size(frame, &fin, &size) < 0) return NULL;
        binary = op == op_binary;
        if (!fin) {
            self->out_op_binary = (char)binary;
            self->out_size = size;
            return Py_NewRef(frame);
        }
    }
    else if (op == op_cont) {
        if (fin_and_size(frame, &fin, &size) < 0) return NULL;
        size += self->out_size;
        if (!fin) {
            self->out_size = size;
            return Py_NewRef(frame);
        }
        binary = self->out_op_binary;
    }
    else if (op == op_ping) {
        return call_back(self, str_ping, frame);
    }
    else {
        return Py_NewRef(frame);
    }
    LayoutObject *layout = self->layout;
    unsigned long long *h = histogram(self);
    if (h == NULL) return NULL;
    if (binary) self->out_binary++;
    else self->out_text++;
    self->out_bytes += size;
    h[layout->off_out + size_bucket(layout, size)]++;
    if (layout->on_sent != NULL) {
        PyObject *n = PyLong_FromSsize_t(size);
        if (n == NULL) return NULL;
        PyObject *call_args[3] = {(PyObject *)self, binary ? Py_True : Py_False, n};
        PyObject *result = PyObject_Vectorcall(layout->on_sent, call_args, 3, NULL);
        Py_DECREF(n);
        if (result == NULL) return NULL;
        Py_DECREF(result);
    }
    return Py_NewRef(frame);
}

/* Count one message's handling time; its bucket, or -1 on error. */
static Py_ssize_t
count_duration(CountsObject *self, double duration)
{
    LayoutObject *layout = self->layout;
    unsigned long long *h = histogram(self);
    if (h == NULL) return -1;
    /* Most messages are handled within the first bucket: no search for them. */
    Py_ssize_t bucket = duration <= layout->duration_bounds[0]
        ? 0
        : bisect_left(layout->duration_bounds, layout->n_duration, duration);
    h[layout->off_duration + bucket]++;
    self->handling_sum += duration;
    return bucket;
}

/* add_duration(seconds) -> bucket: count one message's handling time. */
static PyObject *
Counts_add_duration(CountsObject *self, PyObject *arg)
{
    double duration = PyFloat_AsDouble(arg);
    if (duration == -1.0 && PyErr_Occurred()) return NULL;
    Py_ssize_t bucket = count_duration(self, duration);
    return bucket < 0 ? NULL : PyLong_FromSsize_t(bucket);
}

/* add_rtt(seconds): count one ping round trip. */
static PyObject *
Counts_add_rtt(CountsObject *self, PyObject *arg)
{
    double rtt = PyFloat_AsDouble(arg);
    if (rtt == -1.0 && PyErr_Occurred()) return NULL;
    LayoutObject *layout = self->layout;
    unsigned long long *h = histogram(self);
    if (h == NULL) return NULL;
    h[layout->off_rtt + bisect_left(layout->rtt_bounds, layout->n_rtt, rtt)]++;
    self->rtt_sum += rtt;
    Py_RETURN_NONE;
}

/* -- timing recv(): an awaitable around websockets' own recv() coroutine ------------ */

static double
perf_counter(void)
{
    /* time.perf_counter() on Linux and macOS: the same clock as the Python side. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* An awaitable around one recv() coroutine. ``record`` and ``inner`` are set while it
 * is in use and cleared once it is done: a done awaitable that only its record holds
 * (the record's ``timed`` cache) is reused for the next recv(), so that a message costs
 * no allocation, and an idle record and its cached awaitable make no reference cycle. */
typedef struct {
    PyObject_HEAD
    CountsObject *record;
    PyObject *inner;              /* the coroutine being awaited */
} TimedObject;

static PyTypeObject TimedType;
static PyTypeObject CountsType;

/* A sink raised: log it (core._sink_error) and carry on, as the Python core does. */
static void
sink_failed(LayoutObject *layout, PyObject *method)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
    PyObject *args[3] = {layout->message_sink, method, value != NULL ? value : Py_None};
    PyObject *r = PyObject_Vectorcall(layout->sink_failed, args, 3, NULL);
    if (r == NULL) PyErr_WriteUnraisable(layout->sink_failed);
    Py_XDECREF(r);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* The only message sink's message_started, as ConnectionRecord.message_handed. */
static void
single_started(CountsObject *record, PyObject *message)
{
    LayoutObject *layout = record->layout;
    if (record->sample_skip > 0) {
        record->sample_skip--;
        Py_XSETREF(record->tokens, Py_NewRef(message));
        record->token_deferred = 1;
        return;
    }
    /* args[0] is scratch space for the callee (PY_VECTORCALL_ARGUMENTS_OFFSET). */
    PyObject *args[4] = {NULL, layout->message_sink, (PyObject *)record, message};
    PyObject *token = PyObject_VectorcallMethod(
        str_message_started, args + 1, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (token == NULL) {
        sink_failed(layout, str_message_started);
        token = Py_NewRef(Py_None);
    }
    char deferred = token == layout->not_sampled;
    if (deferred) Py_SETREF(token, Py_NewRef(message));
    Py_XSETREF(record->tokens, token);
    record->token_deferred = deferred;
}

/* The only message sink's message_finished, as ConnectionRecord.message_done(None). */
static int
single_finished(CountsObject *record, double duration)
{
    LayoutObject *layout = record->layout;
    PyObject *token = record->tokens != NULL ? record->tokens : Py_NewRef(Py_None);
    record->tokens = NULL;
    char deferred = record->token_deferred;
    record->token_deferred = 0;
    if (!deferred || (layout->keep_threshold >= 0 && duration >= layout->keep_threshold)) {
        PyObject *d = PyFloat_FromDouble(duration);
        if (d == NULL) {
            Py_DECREF(token);
            return -1;
        }
        PyObject *args[6] = {NULL, layout->message_sink, (PyObject *)record, token, d, Py_None};
        PyObject *r = PyObject_VectorcallMethod(
            str_message_finished, args + 1, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(d);
        if (r == NULL) sink_failed(layout, str_message_finished);
        Py_XDECREF(r);
    }
    Py_DECREF(token);
    return 0;
}

/* The handler got ``message``: handling starts now. */
static int
handled(CountsObject *record, PyObject *message)
{
    if (!record->layout->message_sinks) {
        record->handling_start = perf_counter();
        return 0;
    }
    if (record->layout->message_sink != NULL) {
        record->handling_start = perf_counter();
        single_started(record, message);
        return 0;
    }
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)record, str_message_handed, message);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static PySendResult
Timed_am_send(TimedObject *self, PyObject *value, PyObject **result)
{
    if (self->inner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited recv()");
        *result = NULL;
        return PYGEN_ERROR;
    }
    PySendResult status = PyIter_Send(self->inner, value, result);
    if (status == PYGEN_RETURN) {
        Py_CLEAR(self->inner);
        int failed = handled(self->record, *result) < 0;
        Py_CLEAR(self->record);
        if (failed) {
            Py_CLEAR(*result);
            return PYGEN_ERROR;
        }
    }
    else if (status == PYGEN_ERROR) {
        Py_CLEAR(self->inner);
        Py_CLEAR(self->record);
    }
    return status;
}

/* The result of a send: the value yielded, or StopIteration(value) raised. */
static PyObject *
stop_or_yield(PySendResult status, PyObject *result)
{
    if (status == PYGEN_NEXT) return result;
    if (status == PYGEN_RETURN) {
        if (result == Py_None) PyErr_SetNone(PyExc_StopIteration);
        else {
            /* An instance, so that a tuple value is not taken for arguments. */
            PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, result);
            if (exc != NULL) {
                PyErr_SetObject(PyExc_StopIteration, exc);
                Py_DECREF(exc);
            }
        }
        Py_DECREF(result);
    }
    return NULL;
}

static PyObject *
Timed_iternext(TimedObject *self)
{
    PyObject *result;
    PySendResult status = Timed_am_send(self, Py_None, &result);
    if (status == PYGEN_RETURN && result == Py_None) {
        Py_DECREF(result);
        return NULL; /* StopIteration without a value */
    }
    return stop_or_yield(status, result);
}

static PyObject *
Timed_send(TimedObject *self, PyObject *value)
{
    PyObject *result;
    PySendResult status = Timed_am_send(self, value, &result);
    return stop_or_yield(status, result);
}

/* throw(*args) into ``inner`` (NULL: nothing to delegate to, so raise what was thrown,
 * as a finished coroutine does). Returns what it yielded (it caught it and waits
 * again); else NULL, with *value its return value (it caught it and returned: *status
 * PYGEN_RETURN) or the error set (PYGEN_ERROR). */
static PyObject *
throw_into(PyObject *inner, PyObject *args, PySendResult *status, PyObject **value)
{
    *status = PYGEN_ERROR;
    *value = NULL;
    if (inner == NULL) {
        PyObject *typ, *val = NULL, *tb = NULL;
        if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb)) return NULL;
        if (PyExceptionInstance_Check(typ)) PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
        else PyErr_SetObject(typ, val);
        return NULL;
    }
    Py_INCREF(inner);
    PyObject *result = NULL;
    PyObject *meth = PyObject_GetAttr(inner, str_throw);
    if (meth != NULL) {
        result = PyObject_Call(meth, args, NULL);
        Py_DECREF(meth);
    }
    Py_DECREF(inner);
    if (result != NULL || !PyErr_ExceptionMatches(PyExc_StopIteration)) return result;
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    *value = exc != NULL ? PyObject_GetAttrString(exc, "value") : Py_NewRef(Py_None);
    Py_XDECREF(type);
    Py_XDECREF(exc);
    Py_XDECREF(tb);
    if (*value != NULL) *status = PYGEN_RETURN;
    return NULL;
}

/* throw(...): into the inner coroutine (cancellation, timeouts). */
static PyObject *
Timed_throw(TimedObject *self, PyObject *args)
{
    PySendResult status;
    PyObject *value;
    PyObject *result = throw_into(self->inner, args, &status, &value);
    if (result != NULL || self->inner == NULL) return result;
    Py_CLEAR(self->inner);
    if (status == PYGEN_ERROR) {
        Py_CLEAR(self->record);
        return NULL;
    }
    /* The coroutine caught it and returned: the handler got a message after all. */
    int failed = self->record != NULL && handled(self->record, value) < 0;
    Py_CLEAR(self->record);
    if (failed) {
        Py_DECREF(value);
        return NULL;
    }
    return stop_or_yield(PYGEN_RETURN, value);
}

static PyObject *
Timed_close(TimedObject *self, PyObject *unused)
{
    PyObject *inner = self->inner;
    Py_CLEAR(self->record);
    if (inner == NULL) Py_RETURN_NONE;
    self->inner = NULL;
    PyObject *result = PyObject_CallMethodNoArgs(inner, str_close);
    Py_DECREF(inner);
    return result;
}

static PyObject *
Timed_await(TimedObject *self)
{
    return Py_NewRef(self);
}

static int
Timed_traverse(TimedObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->record);
    Py_VISIT(self->inner);
    return 0;
}

static int
Timed_clear(TimedObject *self)
{
    Py_CLEAR(self->record);
    Py_CLEAR(self->inner);
    return 0;
}

static void
Timed_dealloc(TimedObject *self)
{
    PyObject_GC_UnTrack(self);
    Timed_clear(self);
    PyObject_GC_Del(self);
}

static PyMethodDef Timed_methods[] = {
    {"send", (PyCFunction)Timed_send, METH_O, NULL},
    {"throw", (PyCFunction)Timed_throw, METH_VARARGS, NULL},
    {"close", (PyCFunction)Timed_close, METH_NOARGS, NULL},
    {NULL},
};

static PyAsyncMethods Timed_as_async = {
    .am_await = (unaryfunc)Timed_await,
    .am_send = (sendfunc)Timed_am_send,
};

static PyTypeObject TimedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ws_monitoring._speedups.TimedRecv",
    .tp_doc = PyDoc_STR("An awaitable recv() timing how long its message is handled."),
    .tp_basicsize = sizeof(TimedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_as_async = &Timed_as_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Timed_iternext,
    .tp_methods = Timed_methods,
    .tp_traverse = (traverseproc)Timed_traverse,
    .tp_clear = (inquiry)Timed_clear,
    .tp_dealloc = (destructor)Timed_dealloc,
};

/* -- Then: await a coroutine, then a tail made from how it ended --------------------- */

/* ``Then(inner, tail, arg)`` awaits ``inner``; when it returns or raises, it calls
 * ``tail(arg, None)`` or ``tail(arg, exc)`` for a coroutine and awaits that, whose result
 * is the result. What an ``async def`` doing ``try: await inner except BaseException as e:
 * await tail(arg, e) else: await tail(arg, None)`` does, in 64 bytes and without a Python
 * frame: the connection handler's wrapper, which lives as long as its connection (see
 * adapters/asyncio.py). */
typedef struct {
    PyObject_HEAD
    PyObject *inner;   /* what is awaited now: the handler's coroutine, then the tail's */
    PyObject *tail;    /* NULL once called */
    PyObject *arg;     /* tail's first argument; NULL once called */
} ThenObject;

static PyTypeObject ThenType;

/* The iterator to drive for awaitable ``obj`` (a new reference), or NULL. */
static PyObject *
await_iter(PyObject *obj)
{
    if (PyCoro_CheckExact(obj)) return Py_NewRef(obj);
    PyAsyncMethods *am = Py_TYPE(obj)->tp_as_async;
    if (am == NULL || am->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return am->am_await(obj);
}

static PyObject *
Then_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *inner, *tail, *arg;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Then() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Then", 3, 3, &inner, &tail, &arg)) return NULL;
    PyObject *it = await_iter(inner);
    if (it == NULL) return NULL;
    ThenObject *self = PyObject_GC_New(ThenObject, type);
    if (self == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    self->inner = it;
    self->tail = Py_NewRef(tail);
    self->arg = Py_NewRef(arg);
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* The inner coroutine ended: returned (``exc`` NULL) or raised (the error indicator is
 * set). Switch to the tail's coroutine and send it its first value. */
static PySendResult
Then_switch(ThenObject *self, PySendResult status, PyObject **result)
{
    PyObject *tail = self->tail, *first = self->arg, *arg;
    self->tail = NULL;
    self->arg = NULL;
    Py_CLEAR(self->inner);
    if (status == PYGEN_RETURN) {
        Py_CLEAR(*result);
        arg = Py_NewRef(Py_None);
    }
    else {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        arg = value != NULL ? value : Py_NewRef(Py_None);
    }
    PyObject *call[2] = {first, arg};
    PyObject *coro = PyObject_Vectorcall(tail, call, 2, NULL);
    Py_DECREF(arg);
    Py_DECREF(first);
    Py_DECREF(tail);
    if (coro == NULL) {
        *result = NULL;
        return PYGEN_ERROR;
    }
    self->inner = await_iter(coro);
    Py_DECREF(coro);
    if (self->inner == NULL) {
        *result = NULL;
        return PYGEN_ERROR;
    }
    return PyIter_Send(self->inner, Py_None, result);
}

static PySendResult
Then_am_send(ThenObject *self, PyObject *value, PyObject **result)
{
    if (self->inner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        *result = NULL;
        return PYGEN_ERROR;
    }
    PySendResult status = PyIter_Send(self->inner, value, result);
    if (status != PYGEN_NEXT && self->tail != NULL) status = Then_switch(self, status, result);
    if (status != PYGEN_NEXT) Py_CLEAR(self->inner);
    return status;
}

static PyObject *
Then_iternext(ThenObject *self)
{
    PyObject *result;
    PySendResult status = Then_am_send(self, Py_None, &result);
    if (status == PYGEN_RETURN && result == Py_None) {
        Py_DECREF(result);
        return NULL;
    }
    return stop_or_yield(status, result);
}

static PyObject *
Then_send(ThenObject *self, PyObject *value)
{
    PyObject *result;
    PySendResult status = Then_am_send(self, value, &result);
    return stop_or_yield(status, result);
}

/* throw(...): into what is awaited now (cancellation, timeouts). */
static PyObject *
Then_throw(ThenObject *self, PyObject *args)
{
    PySendResult status;
    PyObject *value;
    PyObject *result = throw_into(self->inner, args, &status, &value);
    if (result != NULL || self->inner == NULL) return result;
    if (self->tail != NULL) status = Then_switch(self, status, &value);
    if (status != PYGEN_NEXT) Py_CLEAR(self->inner);
    return stop_or_yield(status, value);
}

/* close(): as for a coroutine closed while it awaits. The handler's coroutine is closed;
 * the tail then starts with GeneratorExit and is closed at its first suspension, so its
 * ``finally`` clauses run. */
static PyObject *
Then_close(ThenObject *self, PyObject *unused)
{
    if (self->inner == NULL) Py_RETURN_NONE;
    PyObject *r = PyObject_CallMethodNoArgs(self->inner, str_close);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    if (self->tail == NULL) {
        Py_CLEAR(self->inner);
        Py_RETURN_NONE;
    }
    PyErr_SetNone(PyExc_GeneratorExit);
    PyObject *result;
    PySendResult status = Then_switch(self, PYGEN_ERROR, &result);
    if (status == PYGEN_NEXT) {
        Py_DECREF(result);
        r = PyObject_CallMethodNoArgs(self->inner, str_close);
        Py_CLEAR(self->inner);
        if (r == NULL) return NULL;
        Py_DECREF(r);
        Py_RETURN_NONE;
    }
    Py_CLEAR(self->inner);
    if (status == PYGEN_RETURN) {
        Py_DECREF(result);
        Py_RETURN_NONE;
    }
    if (PyErr_ExceptionMatches(PyExc_GeneratorExit)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return NULL;
}

static int
Then_traverse(ThenObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->inner);
    Py_VISIT(self->tail);
    Py_VISIT(self->arg);
    return 0;
}

static int
Then_clear(ThenObject *self)
{
    Py_CLEAR(self->inner);
    Py_CLEAR(self->tail);
    Py_CLEAR(self->arg);
    return 0;
}

static void
Then_dealloc(ThenObject *self)
{
    PyObject_GC_UnTrack(self);
    Then_clear(self);
    PyObject_GC_Del(self);
}

static PyMethodDef Then_methods[] = {
    {"send", (PyCFunction)Then_send, METH_O, NULL},
    {"throw", (PyCFunction)Then_throw, METH_VARARGS, NULL},
    {"close", (PyCFunction)Then_close, METH_NOARGS, NULL},
    {NULL},
};

static PyAsyncMethods Then_as_async = {
    .am_await = (unaryfunc)Timed_await,
    .am_send = (sendfunc)Then_am_send,
};

static PyTypeObject ThenType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ws_monitoring._speedups.Then",
    .tp_doc = PyDoc_STR("Then(inner, tail, arg): await inner, then tail(arg, None or its exception)."),
    .tp_basicsize = sizeof(ThenObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Then_new,
    .tp_as_async = &Then_as_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Then_iternext,
    .tp_methods = Then_methods,
    .tp_traverse = (traverseproc)Then_traverse,
    .tp_clear = (inquiry)Then_clear,
    .tp_dealloc = (destructor)Then_dealloc,
};

/* The handler asks for its next message: handling of the previous one ends. */
static int
handling_ended(CountsObject *self)
{
    double start = self->handling_start;
    if (start != 0.0) {
        LayoutObject *layout = self->layout;
        if (!layout->message_sinks || layout->message_sink != NULL) {
            /* Handling of the previous message ends: message_done(), in C. */
            double duration = perf_counter() - start;
            self->handling_start = 0.0;
            if (layout->message_sink != NULL && single_finished(self, duration) < 0)
                return -1;
            Py_ssize_t bucket = count_duration(self, duration);
            if (bucket < 0) return -1;
            if (self->exemplar_trace_id != NULL && self->exemplar_trace_id != Py_None) {
                PyObject *r = PyObject_CallMethod(
                    (PyObject *)self, "_exemplar", "nd", bucket, duration);
                if (r == NULL) return -1;
                Py_DECREF(r);
            }
        }
        else {
            PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_message_done);
            if (r == NULL) return -1;
            Py_DECREF(r);
        }
    }
    return 0;
}

/* recv_started(): the handler asks for its next message (the threading server). */
static PyObject *
Counts_recv_started(CountsObject *self, PyObject *unused)
{
    if (handling_ended(self) < 0) return NULL;
    Py_RETURN_NONE;
}

/* recv_done(message): recv() returned ``message`` (the threading server). */
static PyObject *
Counts_recv_done(CountsObject *self, PyObject *message)
{
    if (handled(self, message) < 0) return NULL;
    Py_RETURN_NONE;
}

/* timed(coro): the handler asks for its next message; returns coro, timed. */
static PyObject *
Counts_timed(CountsObject *self, PyObject *inner)
{
    if (handling_ended(self) < 0) return NULL;
    TimedObject *timed = (TimedObject *)self->timed;
    if (timed != NULL && Py_REFCNT(timed) == 1 && timed->inner == NULL &&
        timed->record == NULL) {
        /* Done, and held by nobody else: no allocation for this message. */
        Py_INCREF(timed);
    }
    else {
        timed = PyObject_GC_New(TimedObject, &TimedType);
        if (timed == NULL) return NULL;
        timed->record = NULL;
        timed->inner = NULL;
        PyObject_GC_Track(timed);
        /* The record keeps the newest: an old one someone still holds stays theirs. */
        Py_XSETREF(self->timed, Py_NewRef(timed));
    }
    timed->record = (CountsObject *)Py_NewRef(self);
    timed->inner = Py_NewRef(inner);
    return (PyObject *)timed;
}

/* -- RecvMethod: the ``recv`` of connection classes made by serve() ---------------- */

static PyObject *str_record_attr;

typedef struct {
    PyObject_HEAD
    PyObject *func;               /* websockets' own recv (a function of the base class) */
    vectorcallfunc vectorcall;
    PyTypeObject *owner;          /* the class whose slot holds the record, or NULL */
    Py_ssize_t offset;            /* that slot's offset in its instances */
} RecvMethodObject;

/* recv(connection, *args, **kwargs): websockets' recv(), timed by the record. */
static PyObject *
RecvMethod_vectorcall(RecvMethodObject *self, PyObject *const *args, size_t nargsf,
                      PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "recv() needs its connection");
        return NULL;
    }
    PyObject *record;
    if (self->owner != NULL && PyObject_TypeCheck(args[0], self->owner)) {
        /* The record's slot, read as its member descriptor would, without the lookup. */
        record = *(PyObject **)((char *)args[0] + self->offset);
        if (record == NULL) {
            PyErr_SetObject(PyExc_AttributeError, str_record_attr);
            return NULL;
        }
        Py_INCREF(record);
    }
    else {
        record = PyObject_GetAttr(args[0], str_record_attr);
        if (record == NULL) return NULL;
    }
    if (!PyObject_TypeCheck(record, &CountsType)) {
        PyErr_Format(PyExc_TypeError, "not a connection record: %R", record);
        Py_DECREF(record);
        return NULL;
    }
    /* The arguments as given: websockets checks them, with its own errors. */
    PyObject *coro = PyObject_Vectorcall(self->func, args, nargsf, kwnames);
    if (coro == NULL) {
        Py_DECREF(record);
        return NULL;
    }
    PyObject *timed = Counts_timed((CountsObject *)record, coro);
    Py_DECREF(coro);
    Py_DECREF(record);
    return timed;
}

/* RecvMethod(recv, record_slot=None): ``record_slot``, the member descriptor of a
 * ``__slots__`` entry named _ws_monitoring_record, lets instances of its class skip the
 * attribute lookup; others (e.g. a record in the instance dict) are looked up. */
static PyObject *
RecvMethod_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"recv", "record_slot", NULL};
    PyObject *func, *slot = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:RecvMethod", kwlist, &func, &slot))
        return NULL;
    if (!PyCallable_Check(func)) {
        PyErr_SetString(PyExc_TypeError, "RecvMethod() needs websockets' recv function");
        return NULL;
    }
    PyTypeObject *owner = NULL;
    Py_ssize_t offset = 0;
    if (slot != Py_None) {
        PyMemberDef *member = Py_IS_TYPE(slot, &PyMemberDescr_Type)
            ? ((PyMemberDescrObject *)slot)->d_member : NULL;
        if (member == NULL || member->type != T_OBJECT_EX || (member->flags & READONLY) ||
            PyUnicode_CompareWithASCIIString(PyDescr_NAME(slot), "_ws_monitoring_record") != 0) {
            PyErr_SetString(PyExc_TypeError,
                            "record_slot must be the __slots__ entry _ws_monitoring_record");
            return NULL;
        }
        owner = PyDescr_TYPE(slot);
        offset = member->offset;
    }
    RecvMethodObject *self = (RecvMethodObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->func = Py_NewRef(func);
    self->vectorcall = (vectorcallfunc)RecvMethod_vectorcall;
    self->owner = (PyTypeObject *)Py_XNewRef((PyObject *)owner);
    self->offset = offset;
    return (PyObject *)self;
}

static PyObject *
RecvMethod_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

/* __name__, __doc__, __wrapped__...: those of websockets' recv, as functools.wraps does. */
static PyObject *
RecvMethod_getattro(RecvMethodObject *self, PyObject *name)
{
    PyObject *value = PyObject_GenericGetAttr((PyObject *)self, name);
    if (value != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) return value;
    PyErr_Clear();
    if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "__wrapped__") == 0)
        return Py_NewRef(self->func);
    return PyObject_GetAttr(self->func, name);
}

static PyObject *
RecvMethod_get_doc(RecvMethodObject *self, void *closure)
{
    return PyObject_GetAttrString(self->func, "__doc__");
}

static PyGetSetDef RecvMethod_getset[] = {
    {"__doc__", (getter)RecvMethod_get_doc, NULL, NULL, NULL},
    {NULL},
};

static int
RecvMethod_traverse(RecvMethodObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->func);
    Py_VISIT(self->owner);
    return 0;
}

static int
RecvMethod_clear(RecvMethodObject *self)
{
    Py_CLEAR(self->func);
    /* ``owner`` stays until dealloc: a call may still read its slot offset. */
    return 0;
}

static void
RecvMethod_dealloc(RecvMethodObject *self)
{
    PyObject_GC_UnTrack(self);
    RecvMethod_clear(self);
    Py_CLEAR(self->owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RecvMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ws_monitoring._speedups.RecvMethod",
    .tp_doc = PyDoc_STR("RecvMethod(recv, record_slot=None): websockets' recv, timed by the "
                        "connection's record."),
    .tp_basicsize = sizeof(RecvMethodObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_vectorcall_offset = offsetof(RecvMethodObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = RecvMethod_new,
    .tp_descr_get = RecvMethod_get,
    .tp_getattro = (getattrofunc)RecvMethod_getattro,
    .tp_getset = RecvMethod_getset,
    .tp_traverse = (traverseproc)RecvMethod_traverse,
    .tp_clear = (inquiry)RecvMethod_clear,
    .tp_dealloc = (destructor)RecvMethod_dealloc,
};

static PyObject *
Counts_get_h(CountsObject *self, void *closure)
{
    if (self->h == NULL) Py_RETURN_NONE;
    Py_ssize_t n = self->layout->length;
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyLong_FromUnsignedLongLong(self->h[i]);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyMethodDef Counts_methods[] = {
    {"decode", (PyCFunction)(void (*)(void))Counts_decode, METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("decode(frame, *, max_size=None) -> frame: count a received frame.")},
    {"encode", (PyCFunction)Counts_encode, METH_O,
     PyDoc_STR("encode(frame) -> frame: count a sent frame.")},
    {"add_duration", (PyCFunction)Counts_add_duration, METH_O,
     PyDoc_STR("add_duration(seconds) -> bucket index: count a message's handling time.")},
    {"add_rtt", (PyCFunction)Counts_add_rtt, METH_O,
     PyDoc_STR("add_rtt(seconds): count a ping's round-trip time.")},
    {"recv_started", (PyCFunction)Counts_recv_started, METH_NOARGS,
     PyDoc_STR("recv_started(): the handler asks for its next message.")},
    {"recv_done", (PyCFunction)Counts_recv_done, METH_O,
     PyDoc_STR("recv_done(message): the handler got message.")},
    {"timed", (PyCFunction)Counts_timed, METH_O,
     PyDoc_STR("timed(coroutine) -> awaitable: the handler asks for its next message.")},
    {NULL},
};

static PyMemberDef Counts_members[] = {
    {"in_text", T_LONGLONG, offsetof(CountsObject, in_text), 0, NULL},
    {"in_binary", T_LONGLONG, offsetof(CountsObject, in_binary), 0, NULL},
    {"out_text", T_LONGLONG, offsetof(CountsObject, out_text), 0, NULL},
    {"out_binary", T_LONGLONG, offsetof(CountsObject, out_binary), 0, NULL},
    {"in_bytes", T_LONGLONG, offsetof(CountsObject, in_bytes), 0, NULL},
    {"out_bytes", T_LONGLONG, offsetof(CountsObject, out_bytes), 0, NULL},
    {"handling_sum", T_DOUBLE, offsetof(CountsObject, handling_sum), 0, NULL},
    {"rtt_sum", T_DOUBLE, offsetof(CountsObject, rtt_sum), 0, NULL},
    {"handling_start", T_DOUBLE, offsetof(CountsObject, handling_start), 0, NULL},
    {"opened_at", T_DOUBLE, offsetof(CountsObject, opened_at), 0, NULL},
    {"opened_unix", T_DOUBLE, offsetof(CountsObject, opened_unix), 0, NULL},
    {"closed_at", T_DOUBLE, offsetof(CountsObject, closed_at), 0, NULL},
    {"ping_sent_at", T_DOUBLE, offsetof(CountsObject, ping_sent_at), 0, NULL},
    {"tokens", T_OBJECT, offsetof(CountsObject, tokens), 0, NULL},
    {"exemplar_trace_id", T_OBJECT, offsetof(CountsObject, exemplar_trace_id), 0, NULL},
    {"token_deferred", T_BOOL, offsetof(CountsObject, token_deferred), 0, NULL},
    {"sample_skip", T_LONGLONG, offsetof(CountsObject, sample_skip), 0, NULL},
    {NULL},
};

static PyGetSetDef Counts_getset[] = {
    {"h", (getter)Counts_get_h, NULL,
     PyDoc_STR("Per-bucket counts (a new list), or None before the first count."), NULL},
    {NULL},
};

static PyTypeObject CountsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ws_monitoring._speedups.Counts",
    .tp_doc = PyDoc_STR("Counts(layout): one connection's counters; base of ConnectionRecord."),
    .tp_basicsize = sizeof(CountsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Counts_init,
    .tp_traverse = (traverseproc)Counts_traverse,
    .tp_clear = (inquiry)Counts_clear,
    .tp_dealloc = (destructor)Counts_dealloc,
    .tp_methods = Counts_methods,
    .tp_members = Counts_members,
    .tp_getset = Counts_getset,
};

/* -- scrapes ---------------------------------------------------------------------- */

/* sum_counts(records, length): column sums of many records, for a scrape. */
static PyObject *
sum_counts(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "sum_counts(records, length)");
        return NULL;
    }
    PyObject *fast = PySequence_Fast(args[0], "records must be a sequence");
    if (fast == NULL) return NULL;
    Py_ssize_t length = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (length < 0) {
        Py_DECREF(fast);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "length must be >= 0");
        return NULL;
    }
    long long totals[6] = {0};
    double sums[2] = {0.0, 0.0};
    unsigned long long *h = NULL;
    PyObject *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyObject_TypeCheck(item, &CountsType)) {
            PyErr_Format(PyExc_TypeError, "not a Counts: %R", item);
            goto done;
        }
        CountsObject *c = (CountsObject *)item;
        totals[0] += c->in_text;
        totals[1] += c->in_binary;
        totals[2] += c->out_text;
        totals[3] += c->out_binary;
        totals[4] += c->in_bytes;
        totals[5] += c->out_bytes;
        sums[0] += c->handling_sum;
        sums[1] += c->rtt_sum;
        if (c->h == NULL) continue;
        if (c->layout->length != length) {
            PyErr_SetString(PyExc_ValueError, "a record has another histogram layout");
            goto done;
        }
        if (h == NULL && (h = PyMem_Calloc((size_t)length ? (size_t)length : 1, sizeof(*h))) == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t j = 0; j < length; j++) h[j] += c->h[j];
    }
    PyObject *hist = Py_None;
    Py_INCREF(hist);
    if (h != NULL) {
        Py_DECREF(hist);
        hist = PyList_New(length);
        if (hist == NULL) goto done;
        for (Py_ssize_t j = 0; j < length; j++) {
            PyObject *v = PyLong_FromUnsignedLongLong(h[j]);
            if (v == NULL) {
                Py_DECREF(hist);
                goto done;
            }
            PyList_SET_ITEM(hist, j, v);
        }
    }
    result = Py_BuildValue("(LLLLLLddN)", totals[0], totals[1], totals[2], totals[3], totals[4],
                           totals[5], sums[0], sums[1], hist);
done:
    PyMem_Free(h);
    Py_DECREF(fast);
    return result;
}

static PyMethodDef module_methods[] = {
    {"sum_counts", (PyCFunction)(void (*)(void))sum_counts, METH_FASTCALL,
     PyDoc_STR("sum_counts(records, length) -> (in_text, in_binary, out_text, out_binary, "
               "in_bytes, out_bytes, handling_sum, rtt_sum, h or None)")},
    {NULL},
};

/* -- module ----------------------------------------------------------------------- */

static int
intern(PyObject **slot, const char *name)
{
    *slot = PyUnicode_InternFromString(name);
    return *slot == NULL ? -1 : 0;
}

static int
opcode(PyObject *opcodes, PyObject **slot, const char *name)
{
    *slot = PyObject_GetAttrString(opcodes, name);
    return *slot == NULL ? -1 : 0;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ws_monitoring._speedups",
    .m_doc = "C implementation of ws_monitoring's per-frame counting.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&LayoutType) < 0 || PyType_Ready(&CountsType) < 0 ||
        PyType_Ready(&TimedType) < 0 || PyType_Ready(&RecvMethodType) < 0 ||
        PyType_Ready(&ThenType) < 0)
        return NULL;
    if (intern(&str_opcode, "opcode") < 0 || intern(&str_data, "data") < 0 ||
        intern(&str_fin, "fin") < 0 || intern(&str_rsv1, "rsv1") < 0 ||
        intern(&str_rsv2, "rsv2") < 0 || intern(&str_rsv3, "rsv3") < 0 ||
        intern(&str_pong, "_pong") < 0 || intern(&str_ping, "_ping") < 0 ||
        intern(&str_close_frame, "_close_frame") < 0 ||
        intern(&str_message_done, "message_done") < 0 ||
        intern(&str_message_handed, "message_handed") < 0 || intern(&str_throw, "throw") < 0 ||
        intern(&str_message_started, "message_started") < 0 ||
        intern(&str_message_finished, "message_finished") < 0 ||
        intern(&str_close, "close") < 0 ||
        intern(&str_record_attr, "_ws_monitoring_record") < 0)
        return NULL;
    PyObject *frames = PyImport_ImportModule("websockets.frames");
    if (frames == NULL) return NULL;
    PyObject *opcodes = PyObject_GetAttrString(frames, "Opcode");
    Py_DECREF(frames);
    if (opcodes == NULL) return NULL;
    int failed = opcode(opcodes, &op_text, "TEXT") < 0 || opcode(opcodes, &op_binary, "BINARY") < 0 ||
        opcode(opcodes, &op_cont, "CONT") < 0 || opcode(opcodes, &op_ping, "PING") < 0 ||
        opcode(opcodes, &op_pong, "PONG") < 0 || opcode(opcodes, &op_close, "CLOSE") < 0;
    Py_DECREF(opcodes);
    if (failed) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Layout", (PyObject *)&LayoutType) < 0 ||
        PyModule_AddObjectRef(m, "Counts", (PyObject *)&CountsType) < 0 ||
        PyModule_AddObjectRef(m, "RecvMethod", (PyObject *)&RecvMethodType) < 0 ||
        PyModule_AddObjectRef(m, "Then", (PyObject *)&ThenType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
