/* mailpush._speedups: the fan-out path in C (issue 14).
 *
 * A fan-out publish (one event to each of thousands of subscribers) spends
 * mailpush's own CPU in three Python loops: the publish items out of
 * msgspec's structs (items._fast_items), offsets, frames and history
 * (history.record), and the dispatcher's loop with one send() per tab
 * (Dispatcher.deliver, Connection.send). These are the same three loops,
 * step for step, without the interpreter between the steps:
 *
 *   fast_items(decoded, all_events, empty)      items._fast_items
 *   event_frame(sub, event, data, offset)       packets.event_frame (None:
 *                                               not a case done here)
 *   record_loop(...)                            history.record's loop
 *   deliver_run(...)                            Dispatcher.deliver's loop
 *
 * and for the upgrade: parse_request (handshake.parse_request), one_frame
 * (frames.Decoder, one small frame) and accept_fd (rawsock.accept_fd).
 *
 * Each is optional: the Python twin stays, is what runs without a compiler
 * or with MAILPUSH_SPEEDUPS=0, and the tests hold each pair to the same
 * results (tests/test_speedups.py). Only the common case is done here;
 * anything else (a string that needs JSON escaping, a dict as data, a
 * connection that is not a plain Connection, a subscriber with many tabs)
 * goes back to the Python code, which does it the one way it always has.
 *
 * Plain CPython API, no third-party headers. The two private layouts it
 * reads (a slotted class's member offsets, a socket object's descriptor)
 * are checked against the public attribute before they are trusted.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

static PyObject *RawType;           /* msgspec.Raw */
static PyObject *s_data, *s_event, *s_subscriber, *s_state, *s_entries, *s_floor, *s_append, *s_popleft,
    *s_pop, *s_send, *s_start_writer, *s_abort, *s_fileno, *s_sock, *s_queue, *s_events;

/* The exception being raised, taken (the error indicator cleared). */
static PyObject *take_exception(void) {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value ? value : Py_NewRef(Py_None);
#endif
}

/* What CPython's collector does to such a tuple the first time it looks
 * (_PyTuple_MaybeUntrack), done at once: a tuple whose elements are all of
 * types the collector does not track (strings, bytes, numbers, None,
 * msgspec's Raw) can be in no cycle, so the collections a fan-out's tens
 * of thousands of tuples set off need not walk them. One flag per element. */
static inline PyObject *untracked(PyObject *t) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); i++)
        if (PyType_IS_GC(Py_TYPE(PyTuple_GET_ITEM(t, i)))) return t;
    PyObject_GC_UnTrack(t);
    return t;
}

/* ---- JSON pieces ------------------------------------------------------- */

/* Some byte of v (eight ASCII bytes) is a control character, '"' or '\\'
 * (the bytes are below 0x80, so each test below is exact: the borrow
 * from a byte that matches can only mark a byte above it, never make a
 * word with no match look like one). */
static inline int needs_escape8(uint64_t v) {
    const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
    uint64_t ctl = (v - 0x20 * ones) & ~v & high;
    uint64_t q = v ^ ('"' * ones), b = v ^ ('\\' * ones);
    q = (q - ones) & ~q & high;
    b = (b - ones) & ~b & high;
    return (ctl | q | b) != 0;
}

/* The string's bytes when it is ASCII and needs no JSON escape (what
 * msgspec would write between the quotes), else NULL. */
static inline const char *plain_ascii(PyObject *s, Py_ssize_t *len) {
    if (!PyUnicode_CheckExact(s) || !PyUnicode_IS_COMPACT_ASCII(s)) return NULL;
    const unsigned char *p = (const unsigned char *)PyUnicode_DATA(s);
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), i = 0;
    uint64_t v;
    for (; i + 8 <= n; i += 8) {
        memcpy(&v, p + i, 8);
        if (needs_escape8(v)) return NULL;
    }
    if (i < n) {
        v = 0x6161616161616161ULL; /* the rest, padded with 'a' (a plain byte) */
        memcpy(&v, p + i, (size_t)(n - i));
        if (needs_escape8(v)) return NULL;
    }
    *len = n;
    return (const char *)p;
}

static const char P1[] = "{\"type\":\"event\",\"subscriber\":\"";
static const char P2[] = "\",\"event\":\"";
static const char P3[] = "\",\"data\":";
static const char P4[] = ",\"offset\":";

/* The frame of packets.event_frame(sub, event, data, offset) for a Raw
 * ``data``, plain strings and an offset that fits; Py_None when this case
 * is not one done here (the caller uses the Python twin); NULL on error. */
static PyObject *build_frame(PyObject *sub, PyObject *event, PyObject *data, PyObject *offset) {
    Py_ssize_t ls, le;
    const char *cs = plain_ascii(sub, &ls);
    const char *ce = cs ? plain_ascii(event, &le) : NULL;
    if (!ce || (PyObject *)Py_TYPE(data) != RawType || !PyLong_CheckExact(offset)) Py_RETURN_NONE;
    int overflow;
    long long off = PyLong_AsLongLongAndOverflow(offset, &overflow);
    if (overflow || off < 0) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    char digits[24];
    int ld = 0;
    do {
        digits[sizeof digits - 1 - ld++] = (char)('0' + off % 10);
        off /= 10;
    } while (off);
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t n = (Py_ssize_t)(sizeof P1 - 1) + ls + (Py_ssize_t)(sizeof P2 - 1) + le + (Py_ssize_t)(sizeof P3 - 1) +
                   view.len + (Py_ssize_t)(sizeof P4 - 1) + ld + 1;
    Py_ssize_t head = n < 126 ? 2 : n < 65536 ? 4 : 10;
    PyObject *out = PyBytes_FromStringAndSize(NULL, head + n);
    if (!out) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out);
    *w++ = 0x81;
    if (n < 126) {
        *w++ = (unsigned char)n;
    } else if (n < 65536) {
        *w++ = 126;
        *w++ = (unsigned char)(n >> 8);
        *w++ = (unsigned char)n;
    } else {
        *w++ = 127;
        for (int k = 7; k >= 0; k--) *w++ = (unsigned char)((unsigned long long)n >> (8 * k));
    }
#define PUT(p, l)           \
    do {                    \
        memcpy(w, (p), (l)); \
        w += (l);           \
    } while (0)
    PUT(P1, sizeof P1 - 1);
    PUT(cs, ls);
    PUT(P2, sizeof P2 - 1);
    PUT(ce, le);
    PUT(P3, sizeof P3 - 1);
    PUT(view.buf, view.len);
    PUT(P4, sizeof P4 - 1);
    PUT(digits + sizeof digits - ld, ld);
    *w = '}';
#undef PUT
    PyBuffer_Release(&view);
    return out;
}

static PyObject *py_event_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "event_frame(subscriber, event, data, offset)");
        return NULL;
    }
    return build_frame(args[0], args[1], args[2], args[3]);
}

/* ---- slotted classes ---------------------------------------------------- */

/* Where a slotted class keeps one attribute (its member descriptor's
 * offset), or -1 when it is not a plain object slot. */
static Py_ssize_t slot_offset(PyObject *type, PyObject *name) {
    PyObject *d = PyObject_GetAttr(type, name);
    if (!d) {
        PyErr_Clear();
        return -1;
    }
    Py_ssize_t off = -1;
    if (Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == T_OBJECT_EX && !(m->flags & READONLY)) off = m->offset;
    }
    Py_DECREF(d);
    return off;
}

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* Remember ``type`` in *seen, and where it keeps each of the n attributes
 * ``names`` (slot_offset: -1 for one that is not a plain slot). */
static void learn_slots(PyObject **seen, PyObject *type, PyObject **const names[], Py_ssize_t *offsets, int n) {
    Py_XSETREF(*seen, Py_NewRef(type));
    for (int k = 0; k < n; k++) offsets[k] = slot_offset(type, *names[k]);
}

/* obj.name (a new reference): from the slot at ``off`` (the caller has
 * checked obj's type: -1 when it is not the learned one), or by name when
 * there is none or it is unset (then the AttributeError is Python's). */
static inline PyObject *get_field(PyObject *obj, Py_ssize_t off, PyObject *name) {
    if (off >= 0) {
        PyObject *v = SLOT(obj, off);
        if (v) return Py_NewRef(v);
    }
    return PyObject_GetAttr(obj, name);
}

/* obj.name = value, in the slot at ``off`` (as get_field) or by name. 0,
 * or -1 on error. */
static inline int set_field(PyObject *obj, Py_ssize_t off, PyObject *name, PyObject *value) {
    if (off >= 0) {
        Py_XSETREF(SLOT(obj, off), Py_NewRef(value));
        return 0;
    }
    return PyObject_SetAttr(obj, name, value);
}

/* ---- items._fast_items ------------------------------------------------- */

/* First byte of a Raw, or -1 (with an error set) */
static int raw_first(PyObject *raw) {
    Py_buffer view;
    if (PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE) < 0) return -1;
    int c = view.len ? ((unsigned char *)view.buf)[0] : 256;
    PyBuffer_Release(&view);
    return c;
}

/* The struct type fast_items last read (msgspec's, items._Item) and where
 * it keeps each field: member offsets, -1 for one that is not a plain slot
 * (then read by name). Read by name the first time, the offsets are
 * checked against it. */
static PyObject *item_type;
enum { IT_SUB, IT_EVENT, IT_DATA, IT_STATE, IT_COUNT };
static PyObject **const item_names[IT_COUNT] = {&s_subscriber, &s_event, &s_data, &s_state};
static Py_ssize_t off_it[IT_COUNT] = {-1, -1, -1, -1};

/* a and b are str objects of the same text */
static inline int same_text(PyObject *a, PyObject *b) {
    if (!PyUnicode_CheckExact(a) || !PyUnicode_CheckExact(b)) return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    int kind = PyUnicode_KIND(a);
    return n == PyUnicode_GET_LENGTH(b) && kind == (int)PyUnicode_KIND(b) &&
           memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * (size_t)kind) == 0;
}

static PyObject *py_fast_items(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if ((nargs != 3 && nargs != 4) || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "fast_items(decoded: list, all_events, empty[, no_state])");
        return NULL;
    }
    /* no_state: the struct's default state (a Raw of null, one object for
     * every item without one), None without reading its bytes */
    PyObject *decoded = args[0], *all_events = args[1], *empty = args[2], *no_state = nargs == 4 ? args[3] : NULL;
    Py_ssize_t n = PyList_GET_SIZE(decoded);
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    /* The previous item's event name (borrowed: its tuple is in out). A
     * publish names a handful of events, mostly one: an item with the same
     * name shares that string (one per name, not one per event kept) and
     * skips the checks it passed. */
    PyObject *prev_event = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyList_GET_ITEM(decoded, i);
        if ((PyObject *)Py_TYPE(it) != item_type)
            learn_slots(&item_type, (PyObject *)Py_TYPE(it), item_names, off_it, IT_COUNT);
        PyObject *sub = NULL, *event = NULL, *data = NULL, *state = NULL;
        if (!(data = get_field(it, off_it[IT_DATA], s_data))) goto error;
        int first = raw_first(data);
        if (first < 0) goto error;
        if (first != '{') {
            if (first != 'n') goto slow; /* not an object */
            Py_SETREF(data, Py_NewRef(empty));
        }
        if (!(event = get_field(it, off_it[IT_EVENT], s_event))) goto error;
        if (prev_event && (event == prev_event || same_text(event, prev_event))) {
            Py_SETREF(event, Py_NewRef(prev_event));
        } else {
            int eq = PyObject_RichCompareBool(event, all_events, Py_EQ);
            if (eq < 0) goto error;
            if (eq) goto slow;
        }
        if (!(state = get_field(it, off_it[IT_STATE], s_state))) goto error;
        if (state == no_state) {
            Py_SETREF(state, Py_NewRef(Py_None));
        } else {
            first = raw_first(state);
            if (first < 0) goto error;
            if (first != '{' && first != '"') {
                if (first != 'n') goto slow; /* neither a string nor an object */
                Py_SETREF(state, Py_NewRef(Py_None));
            }
        }
        if (!(sub = get_field(it, off_it[IT_SUB], s_subscriber))) goto error;
        PyObject *t = PyTuple_New(4);
        if (!t) goto error;
        prev_event = event;
        PyTuple_SET_ITEM(t, 0, sub);
        PyTuple_SET_ITEM(t, 1, event);
        PyTuple_SET_ITEM(t, 2, data);
        PyTuple_SET_ITEM(t, 3, state);
        PyList_SET_ITEM(out, i, untracked(t));
        continue;
    slow:
        Py_XDECREF(sub);
        Py_XDECREF(event);
        Py_XDECREF(data);
        Py_XDECREF(state);
        Py_DECREF(out);
        Py_RETURN_NONE;
    error:
        Py_XDECREF(sub);
        Py_XDECREF(event);
        Py_XDECREF(data);
        Py_XDECREF(state);
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* ---- history.record ---------------------------------------------------- */

/* The stream class record_loop last met (history._Stream) and where it
 * keeps entries, floor and state (-1: read by name); and the class of
 * its entries (collections.deque) with that class's append and popleft,
 * called without looking them up on every event. */
static PyObject *stream_type_seen, *entries_type, *entries_append, *entries_popleft;
enum { ST_ENTRIES, ST_FLOOR, ST_STATE, ST_COUNT };
static PyObject **const stream_names[ST_COUNT] = {&s_entries, &s_floor, &s_state};
static Py_ssize_t off_st[ST_COUNT] = {-1, -1, -1};

/* Where a stream keeps field k: -1 (by name) unless it is of the learned class. */
#define STREAM_OFF(stream, k) ((PyObject *)Py_TYPE(stream) == stream_type_seen ? off_st[k] : -1)

/* entries.append(arg), or entries.popleft() with arg NULL, through the
 * cached method of its class when it is that class (a new reference, or
 * NULL on error). */
static inline PyObject *entries_call(PyObject *entries, PyObject *name, PyObject *arg) {
    if ((PyObject *)Py_TYPE(entries) != entries_type) {
        PyObject *type = (PyObject *)Py_TYPE(entries);
        PyObject *a = PyObject_GetAttr(type, s_append), *p = a ? PyObject_GetAttr(type, s_popleft) : NULL;
        if (!p) {
            Py_XDECREF(a);
            PyErr_Clear();
            return arg ? PyObject_CallMethodOneArg(entries, name, arg) : PyObject_CallMethodNoArgs(entries, name);
        }
        Py_XSETREF(entries_type, Py_NewRef(type));
        Py_XSETREF(entries_append, a);
        Py_XSETREF(entries_popleft, p);
    }
    PyObject *argv[2] = {entries, arg};
    return PyObject_Vectorcall(name == s_append ? entries_append : entries_popleft, argv, arg ? 2 : 1, NULL);
}

/* record_loop(items, streams, move_to_end, dropped, floor, size, top, now,
 *             epoch, held, stream_type, frame_fallback) -> (out, top, held)
 *
 * history.record's loop for a history that keeps events (size > 0): each
 * item gets the next offset and its frame, joins its subscriber's stream
 * (made, or moved to the end of ``streams``), the stream keeps at most
 * ``size`` entries. The caller writes top and held back and does the
 * bounds and expiry after it. */
static PyObject *py_record_loop(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12 || !PyList_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "record_loop: bad arguments");
        return NULL;
    }
    PyObject *items = args[0], *streams = args[1], *move = args[2], *dropped = args[3], *floor = args[4];
    Py_ssize_t size = PyLong_AsSsize_t(args[5]);
    long long top = PyLong_AsLongLong(args[6]);
    PyObject *now = args[7], *epoch = args[8];
    Py_ssize_t held = PyLong_AsSsize_t(args[9]);
    PyObject *stream_type = args[10], *fallback = args[11];
    if (PyErr_Occurred()) return NULL;
    if (stream_type != stream_type_seen) learn_slots(&stream_type_seen, stream_type, stream_names, off_st, ST_COUNT);
    Py_ssize_t n = PyList_GET_SIZE(items);
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    PyObject *zero = PyLong_FromLong(0);
    if (!zero) goto fail_out;
    /* The previous item's event name as it came, and the interned string
     * it stands for (both borrowed: held by the items and the tuples made):
     * fast_items hands one string per name, interned here once. */
    PyObject *prev_raw = NULL, *prev_event = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 4) {
            PyErr_SetString(PyExc_TypeError, "record_loop: an item is not a 4-tuple");
            goto fail;
        }
        PyObject *sub = PyTuple_GET_ITEM(item, 0), *event = PyTuple_GET_ITEM(item, 1),
                 *data = PyTuple_GET_ITEM(item, 2), *state = PyTuple_GET_ITEM(item, 3);
        if (event == prev_raw) {
            event = prev_event;
        } else if (PyUnicode_CheckExact(event)) {
            /* one string per event name, not one per event kept (sys.intern) */
            prev_raw = event;
            Py_INCREF(event);
            PyUnicode_InternInPlace(&event);
            Py_DECREF(event); /* alive: an interned string is in that dict only while held; the tuples below take refs */
            prev_event = event;
        }
        PyObject *off = PyLong_FromLongLong(++top);
        if (!off) goto fail;
        PyObject *frame = build_frame(sub, event, data, off);
        if (frame == Py_None) {
            Py_DECREF(frame);
            PyObject *fargs[4] = {sub, event, data, off};
            frame = PyObject_Vectorcall(fallback, fargs, 4, NULL);
        }
        if (!frame) {
            Py_DECREF(off);
            goto fail;
        }
        /* its stream: made, or moved to the end */
        PyObject *stream = PyDict_GetItemWithError(streams, sub); /* borrowed */
        if (stream) {
            Py_INCREF(stream);
            PyObject *r = PyObject_CallOneArg(move, sub);
            if (!r) goto fail_item;
            Py_DECREF(r);
        } else {
            if (PyErr_Occurred()) goto fail_item0;
            PyObject *popargs[3] = {dropped, sub, zero};
            PyObject *lost = PyObject_VectorcallMethod(s_pop, popargs, 3, NULL); /* dropped.pop(sub, 0) */
            if (!lost) goto fail_item0;
            int gt = PyObject_RichCompareBool(lost, floor, Py_GT);
            if (gt < 0) {
                Py_DECREF(lost);
                goto fail_item0;
            }
            stream = PyObject_CallOneArg(stream_type, gt ? lost : floor);
            Py_DECREF(lost);
            if (!stream) goto fail_item0;
            if (PyObject_SetItem(streams, sub, stream) < 0) goto fail_item;
        }
        if (state != Py_None && set_field(stream, STREAM_OFF(stream, ST_STATE), s_state, state) < 0) goto fail_item;
        PyObject *entries = get_field(stream, STREAM_OFF(stream, ST_ENTRIES), s_entries);
        if (!entries) goto fail_item;
        PyObject *entry = PyTuple_Pack(4, off, event, frame, now);
        if (entry) untracked(entry);
        if (!entry) {
            Py_DECREF(entries);
            goto fail_item;
        }
        PyObject *r = entries_call(entries, s_append, entry);
        Py_DECREF(entry);
        if (!r) {
            Py_DECREF(entries);
            goto fail_item;
        }
        Py_DECREF(r);
        Py_ssize_t len = PyObject_Size(entries);
        if (len < 0) {
            Py_DECREF(entries);
            goto fail_item;
        }
        if (len > size) {
            PyObject *old = entries_call(entries, s_popleft, NULL);
            if (!old) {
                Py_DECREF(entries);
                goto fail_item;
            }
            int ok = PyTuple_Check(old) && PyTuple_GET_SIZE(old) > 0 &&
                     set_field(stream, STREAM_OFF(stream, ST_FLOOR), s_floor, PyTuple_GET_ITEM(old, 0)) == 0;
            Py_DECREF(old);
            if (!ok) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "record_loop: a bad history entry");
                Py_DECREF(entries);
                goto fail_item;
            }
        } else {
            held++;
        }
        Py_DECREF(entries);
        Py_DECREF(stream);
        PyObject *o = PyTuple_Pack(6, sub, event, data, off, epoch, frame);
        Py_DECREF(off);
        Py_DECREF(frame);
        if (!o) goto fail;
        PyList_SET_ITEM(out, i, untracked(o));
        continue;
    fail_item:
        Py_DECREF(stream);
    fail_item0:
        Py_DECREF(off);
        Py_DECREF(frame);
        goto fail;
    }
    Py_DECREF(zero);
    return Py_BuildValue("(NLn)", out, top, held);
fail:
    Py_DECREF(zero);
fail_out:
    Py_DECREF(out);
    return NULL;
}

/* ---- Dispatcher.deliver ------------------------------------------------ */

/* The connection class whose sends are done here, and where it keeps what
 * send() reads; a class without these slots is sent to by its own send(). */
static PyObject *conn_type;
enum { CN_SOCK, CN_EVENTS, CN_QUEUE, CN_STATE, CN_COUNT };
static PyObject **const conn_names[CN_COUNT] = {&s_sock, &s_events, &s_queue, &s_state};
static Py_ssize_t off_cn[CN_COUNT] = {-1, -1, -1, -1};
static int conn_fast;

static void learn_conn_type(PyObject *type) {
    learn_slots(&conn_type, type, conn_names, off_cn, CN_COUNT);
    conn_fast = PyType_Check(type) && off_cn[CN_SOCK] >= 0 && off_cn[CN_EVENTS] >= 0 && off_cn[CN_QUEUE] >= 0 &&
                off_cn[CN_STATE] >= 0;
}

/* A socket object's descriptor, read from the object where CPython keeps
 * it (the int after the object header) once that place has been checked
 * against fileno() for the socket's class; -2 when it cannot be. */
static PyTypeObject *sock_type;
static int sock_layout_ok;

static int sock_fd(PyObject *sock) {
    if (Py_TYPE(sock) != sock_type) {
        PyObject *r = PyObject_CallMethodNoArgs(sock, s_fileno);
        if (!r) {
            PyErr_Clear();
            return -2;
        }
        long fd = PyLong_AsLong(r);
        Py_DECREF(r);
        if (fd < 0) {
            PyErr_Clear();
            return -2;
        }
        sock_type = Py_TYPE(sock);
        sock_layout_ok = *(int *)((char *)sock + sizeof(PyObject)) == (int)fd;
        return sock_layout_ok ? (int)fd : -2;
    }
    return sock_layout_ok ? *(int *)((char *)sock + sizeof(PyObject)) : -2;
}

/* Connection.send(frame) for a plain Connection: 1 sent or queued, 0 not
 * (closed, or aborted on a socket error), -1 Python error. */
static int conn_send(PyObject *conn, PyObject *frame) {
    if (conn_fast && Py_TYPE(conn) == (PyTypeObject *)conn_type) {
        PyObject *state = SLOT(conn, off_cn[CN_STATE]), *queue = SLOT(conn, off_cn[CN_QUEUE]),
                 *sock = SLOT(conn, off_cn[CN_SOCK]);
        if (state && queue == Py_None && sock && PyLong_CheckExact(state)) {
            int overflow;
            long st = PyLong_AsLongAndOverflow(state, &overflow);
            if (st != 0 || overflow) return 0; /* not OPEN */
            int fd = sock_fd(sock);
            if (fd >= 0) {
                const char *buf = PyBytes_AS_STRING(frame);
                Py_ssize_t len = PyBytes_GET_SIZE(frame);
                ssize_t n;
                do n = send(fd, buf, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
                while (n < 0 && errno == EINTR);
                if (n == len) return 1;
                if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                    PyObject *r = PyObject_CallMethodNoArgs(conn, s_abort);
                    if (!r) return -1;
                    Py_DECREF(r);
                    return 0;
                }
                /* the socket took part of it or none: a writer sends the rest */
                PyObject *sent = PyLong_FromSsize_t(n < 0 ? 0 : (Py_ssize_t)n);
                if (!sent) return -1;
                PyObject *wargs[3] = {conn, frame, sent};
                PyObject *r = PyObject_VectorcallMethod(s_start_writer, wargs, 3, NULL); /* conn._start_writer(frame, sent) */
                Py_DECREF(sent);
                if (!r) return -1;
                Py_DECREF(r);
                return 1;
            }
        }
    }
    PyObject *r = PyObject_CallMethodOneArg(conn, s_send, frame);
    if (!r) return -1;
    int ok = PyObject_IsTrue(r);
    Py_DECREF(r);
    return ok;
}

/* deliver_run(batch, start, subs, budget, conn_type, pending, resuming,
 *             hooks, held, k)
 *   -> (next, budget, delivered, dropped, exception or None, held, k)
 *
 * Dispatcher.deliver's loop from ``batch[start]``, while ``pending`` is
 * empty (``subs`` is the registry's dict: a subscriber's tabs, a tuple, or
 * a dict beyond a few, taken as a tuple as Registry.get does). ``hooks`` is
 * (recovery.hold, recovery.moved or None, recovery.epoch_changed,
 * packets.event_frame): with ``moved`` (a bus that may lose its history)
 * each event with an offset is checked against its subscriber's epoch
 * first, as in the Python loop; a frame not built yet is built for the
 * first tab that wants it; a tab being caught up (in ``resuming``) has the
 * frame held for it. Returns when a checkpoint is due (budget <= 0): if in
 * the middle of an item's tabs, with them (``held``) and the index of the
 * next one (``k``), to be passed back after the checkpoint; before an item
 * it leaves to the caller (a tab waits for its subscription: the caller
 * does it the Python way); or after an item that raised (its exception is
 * returned, the rest of that item's tabs skipped, as in the Python loop). */
static PyObject *py_deliver_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10 || !PyDict_Check(args[2]) || !PyDict_Check(args[5]) || !PyDict_Check(args[6]) ||
        (args[8] != Py_None && !PyTuple_CheckExact(args[8]))) {
        PyErr_SetString(PyExc_TypeError, "deliver_run: bad arguments");
        return NULL;
    }
    PyObject *batch = args[0], *subs = args[2], *pending = args[5], *resuming = args[6], *hooks = args[7];
    if (!PyTuple_CheckExact(hooks) || PyTuple_GET_SIZE(hooks) != 4) {
        PyErr_SetString(PyExc_TypeError, "deliver_run: hooks is (hold, moved, epoch_changed, event_frame)");
        return NULL;
    }
    PyObject *hold = PyTuple_GET_ITEM(hooks, 0), *moved = PyTuple_GET_ITEM(hooks, 1),
             *epoch_changed = PyTuple_GET_ITEM(hooks, 2), *frame_of = PyTuple_GET_ITEM(hooks, 3);
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    long budget = PyLong_AsLong(args[3]);
    Py_ssize_t k = PyLong_AsSsize_t(args[9]);
    if (PyErr_Occurred()) return NULL;
    if (args[4] != conn_type) learn_conn_type(args[4]);
    PyObject *seq = PySequence_Fast(batch, "deliver_run: the batch is not a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t delivered = 0, dropped = 0;
    PyObject *exc = NULL, *held = args[8] == Py_None ? NULL : Py_NewRef(args[8]); /* the tabs of batch[i] */
    while (i < n) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 6) break;
        PyObject *sub = PyTuple_GET_ITEM(item, 0), *event = PyTuple_GET_ITEM(item, 1),
                 *offset = PyTuple_GET_ITEM(item, 3), *frame = PyTuple_GET_ITEM(item, 5);
        if (frame != Py_None && !PyBytes_CheckExact(frame)) break;
        PyObject *conns = held;
        if (!conns) { /* a new item */
            if (budget <= 0 || PyDict_GET_SIZE(pending)) break;
            k = 0;
            conns = PyDict_GetItemWithError(subs, sub);
            if (!conns) {
                if (PyErr_Occurred()) {
                    exc = take_exception();
                    i++;
                    break;
                }
                dropped++;
                i++;
                continue;
            }
            if (PyTuple_CheckExact(conns)) conns = Py_NewRef(conns);
            else if (PyDict_CheckExact(conns)) conns = PySequence_Tuple(conns); /* a snapshot of its keys */
            else break;
            if (!conns) {
                exc = take_exception();
                i++;
                break;
            }
            if (moved != Py_None && offset != Py_None) { /* from the epoch its tabs have? */
                PyObject *margs[3] = {sub, offset, PyTuple_GET_ITEM(item, 4)};
                PyObject *r = PyObject_Vectorcall(moved, margs, 3, NULL);
                int same = r ? PyObject_IsTrue(r) : -1;
                Py_XDECREF(r);
                if (same == 0) { /* its tabs resync; this event is held for after */
                    r = PyObject_CallOneArg(epoch_changed, sub);
                    same = r ? 1 : -1;
                    Py_XDECREF(r);
                }
                if (same < 0) {
                    exc = take_exception();
                    Py_DECREF(conns);
                    i++;
                    break;
                }
            }
        }
        held = NULL;
        Py_INCREF(item);
        Py_XINCREF(frame); /* ours: built below if it was not */
        Py_ssize_t m = PyTuple_GET_SIZE(conns);
        for (; k < m; k++) {
            if (budget <= 0) { /* a checkpoint is due in the middle of this item's tabs */
                held = Py_NewRef(conns);
                break;
            }
            PyObject *conn = PyTuple_GET_ITEM(conns, k);
            PyObject *events;
            if (conn_fast && Py_TYPE(conn) == (PyTypeObject *)conn_type) {
                events = Py_XNewRef(SLOT(conn, off_cn[CN_EVENTS]));
                if (!events) PyErr_SetObject(PyExc_AttributeError, s_events);
            } else {
                events = PyObject_GetAttr(conn, s_events);
            }
            if (!events) {
                exc = take_exception();
                break;
            }
            if (events != Py_None) {
                int in = PySequence_Contains(events, event);
                Py_DECREF(events);
                if (in < 0) {
                    exc = take_exception();
                    break;
                }
                if (!in) continue;
            } else {
                Py_DECREF(events);
            }
            if (frame == Py_None) { /* the first tab that wants it: built once for all */
                PyObject *built = build_frame(sub, event, PyTuple_GET_ITEM(item, 2), offset);
                if (built == Py_None) {
                    Py_DECREF(built);
                    PyObject *fargs[4] = {sub, event, PyTuple_GET_ITEM(item, 2), offset};
                    built = PyObject_Vectorcall(frame_of, fargs, 4, NULL);
                }
                if (!built) {
                    exc = take_exception();
                    break;
                }
                if (!PyBytes_CheckExact(built)) {
                    Py_DECREF(built);
                    PyErr_SetString(PyExc_TypeError, "deliver_run: event_frame did not give bytes");
                    exc = take_exception();
                    break;
                }
                Py_SETREF(frame, built);
            }
            if (PyDict_GET_SIZE(resuming)) { /* being caught up: the frame waits for it */
                PyObject *resume = PyDict_GetItemWithError(resuming, conn);
                if (resume) {
                    PyObject *hargs[3] = {resume, offset, frame};
                    PyObject *r = PyObject_Vectorcall(hold, hargs, 3, NULL);
                    if (!r) {
                        exc = take_exception();
                        break;
                    }
                    Py_DECREF(r);
                    continue;
                }
                if (PyErr_Occurred()) {
                    exc = take_exception();
                    break;
                }
            }
            int ok = conn_send(conn, frame);
            if (ok < 0) {
                exc = take_exception();
                break;
            }
            delivered += ok;
            budget--;
        }
        Py_DECREF(frame);
        Py_DECREF(item);
        Py_DECREF(conns);
        if (held) break; /* batch[i] goes on after the checkpoint (its frame built again if it was not) */
        i++;
        if (exc) break;
    }
    Py_DECREF(seq);
    if (!exc) exc = Py_NewRef(Py_None);
    if (!held) held = Py_NewRef(Py_None);
    return Py_BuildValue("(nlnnNNn)", i, budget, delivered, dropped, exc, held, held == Py_None ? (Py_ssize_t)0 : k);
}

/* ---- handshake.parse_request --------------------------------------------- */

/* The bits of handshake.py's header mask (tests/test_speedups.py checks
 * them against the Python constants). */
enum { H_HOST = 1, H_UPGRADE = 2, H_CONNECTION = 4, H_KEY = 8, H_VERSION = 16, H_COOKIE = 32,
       H_AUTHORIZATION = 64, H_ORIGIN = 128, H_PROTOCOL = 256, H_LAST_EVENT_ID = 512 };
#define MAX_HEADERS 64

static PyObject *s_method, *s_path, *s_query, *s_cookie, *s_authorization, *s_origin, *s_protocols,
    *s_last_event_id, *s_key, *s_seen, *s_upgrade, *s_version, *s_connection_upgrade, *s_http10;

static inline int is_tchar(unsigned char c) { /* RFC 9110 token character */
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static inline int is_pyspace(unsigned char c) { /* what bytes.strip() strips */
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c;
}

/* ``token`` is one of the comma-separated items of the value (each
 * lowercased and stripped as bytes.strip() does). */
static int has_token(const unsigned char *v, Py_ssize_t n, const char *token) {
    size_t tl = strlen(token);
    Py_ssize_t i = 0;
    while (i <= n) {
        Py_ssize_t j = i;
        while (j < n && v[j] != ',') j++;
        Py_ssize_t a = i, b = j;
        while (a < b && is_pyspace(v[a])) a++;
        while (b > a && is_pyspace(v[b - 1])) b--;
        if ((size_t)(b - a) == tl) {
            size_t k = 0;
            while (k < tl && Py_TOLOWER(v[a + k]) == (unsigned char)token[k]) k++;
            if (k == tl) return 1;
        }
        i = j + 1;
    }
    return 0;
}

/* The Request class parse_request last made and where it keeps each field
 * (-1: set by name); the header names it looks for, from the ``fields``
 * dict last passed (lowercase bytes -> bit), so a header line is matched
 * by comparing bytes, without a bytes object and a dict lookup each. */
static PyObject *req_type;
enum { R_METHOD, R_PATH, R_QUERY, R_COOKIE, R_AUTHORIZATION, R_ORIGIN, R_PROTOCOLS, R_LAST_EVENT_ID, R_KEY, R_SEEN,
       R_UPGRADE, R_VERSION, R_CONNECTION_UPGRADE, R_HTTP10, R_COUNT };
static Py_ssize_t req_off[R_COUNT];
static PyObject **const req_names[R_COUNT] = {&s_method, &s_path, &s_query, &s_cookie, &s_authorization, &s_origin,
                                        &s_protocols, &s_last_event_id, &s_key, &s_seen, &s_upgrade, &s_version,
                                        &s_connection_upgrade, &s_http10};
#define MAX_FIELDS 16
#define MAX_FIELD_NAME 64
static PyObject *fields_seen;
static int n_fields = -1; /* -1: the dict is not one this table can hold (then: a lookup per line) */
static struct {
    Py_ssize_t len;
    char name[MAX_FIELD_NAME];
    long bit;
} field_table[MAX_FIELDS];

static void learn_fields(PyObject *fields) {
    Py_XSETREF(fields_seen, Py_NewRef(fields));
    n_fields = 0;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(fields, &pos, &key, &value)) {
        long bit = PyLong_Check(value) ? PyLong_AsLong(value) : -1;
        if (n_fields >= MAX_FIELDS || !PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) > MAX_FIELD_NAME || bit <= 0) {
            PyErr_Clear();
            n_fields = -1;
            return;
        }
        field_table[n_fields].len = PyBytes_GET_SIZE(key);
        memcpy(field_table[n_fields].name, PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key));
        field_table[n_fields].bit = bit;
        n_fields++;
    }
}

/* Set a field of a Request parse_request made (of the learned class). */
static inline int req_set(PyObject *req, int field, PyObject *value) {
    return set_field(req, req_off[field], *req_names[field], value);
}

static int set_field_str(PyObject *req, int field, const char *p, Py_ssize_t n) {
    PyObject *v = PyUnicode_DecodeLatin1(p, n, NULL);
    if (!v) return -1;
    int r = req_set(req, field, v);
    Py_DECREF(v);
    return r;
}

/* Join a repeated header's value to what came before with ``sep``. */
static int join_field_str(PyObject *req, int field, const char *sep, const char *p, Py_ssize_t n) {
    PyObject *old = get_field(req, req_off[field], *req_names[field]);
    if (!old) return -1;
    if (!PyUnicode_GET_LENGTH(old)) {
        Py_DECREF(old);
        return set_field_str(req, field, p, n);
    }
    PyObject *v = PyUnicode_DecodeLatin1(p, n, NULL);
    PyObject *joined = v ? PyUnicode_FromFormat("%U%s%U", old, sep, v) : NULL;
    Py_DECREF(old);
    Py_XDECREF(v);
    if (!joined) return -1;
    int r = req_set(req, field, joined);
    Py_DECREF(joined);
    return r;
}

/* The bit of the header name h[0:nl] (any case), 0 for none of ours, -1
 * on error. */
static long field_bit(PyObject *fields, const unsigned char *h, Py_ssize_t nl) {
    if (nl > MAX_FIELD_NAME) return 0; /* a longer name is none of ours */
    if (n_fields >= 0) {
        for (int f = 0; f < n_fields; f++) {
            if (field_table[f].len != nl) continue;
            Py_ssize_t k = 0;
            while (k < nl && Py_TOLOWER(h[k]) == (unsigned char)field_table[f].name[k]) k++;
            if (k == nl) return field_table[f].bit;
        }
        return 0;
    }
    char lower[MAX_FIELD_NAME];
    for (Py_ssize_t k = 0; k < nl; k++) lower[k] = (char)Py_TOLOWER(h[k]);
    PyObject *name = PyBytes_FromStringAndSize(lower, nl);
    if (!name) return -1;
    PyObject *b = PyDict_GetItemWithError(fields, name);
    Py_DECREF(name);
    if (!b) return PyErr_Occurred() ? -1 : 0;
    long bit = PyLong_AsLong(b);
    return bit == -1 && PyErr_Occurred() ? -1 : bit;
}

/* parse_request(head, Request, fields) -> Request, or None for any head
 * the Python parser must look at (it raises the precise error). */
static PyObject *py_parse_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyType_Check(args[1]) || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "parse_request(head: bytes, Request, fields: dict)");
        return NULL;
    }
    const unsigned char *h = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    PyTypeObject *type = (PyTypeObject *)args[1];
    PyObject *fields = args[2];
    /* CR and LF only as CRLF, no NUL; the request line */
    Py_ssize_t lines = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = h[i];
        if (c == '\r') {
            if (i + 1 >= n || h[i + 1] != '\n') Py_RETURN_NONE;
            lines++;
            i++;
        } else if (c == '\n' || c == 0) {
            Py_RETURN_NONE;
        }
    }
    if (lines + 1 - 3 > MAX_HEADERS) Py_RETURN_NONE;
    Py_ssize_t eol = 0;
    while (eol < n && h[eol] != '\r') eol++;
    Py_ssize_t sp1 = 0;
    while (sp1 < eol && h[sp1] != ' ') sp1++;
    Py_ssize_t sp2 = sp1 + 1;
    while (sp2 < eol && h[sp2] != ' ') sp2++;
    if (sp1 >= eol || sp2 >= eol || sp1 == 0) Py_RETURN_NONE;
    for (Py_ssize_t i = sp2 + 1; i < eol; i++)
        if (h[i] == ' ') Py_RETURN_NONE; /* a fourth part */
    for (Py_ssize_t i = 0; i < sp1; i++)
        if (!is_tchar(h[i])) Py_RETURN_NONE;
    if (sp2 - sp1 - 1 < 1 || h[sp1 + 1] != '/') Py_RETURN_NONE;
    for (Py_ssize_t i = sp1 + 1; i < sp2; i++)
        if (h[i] < 0x21 || h[i] > 0x7e) Py_RETURN_NONE;
    Py_ssize_t vl = eol - sp2 - 1;
    if (vl != 8 || memcmp(h + sp2 + 1, "HTTP/1.", 7) || (h[sp2 + 8] != '1' && h[sp2 + 8] != '0')) Py_RETURN_NONE;
    int http10 = h[sp2 + 8] == '0';

    if ((PyObject *)type != req_type) learn_slots(&req_type, (PyObject *)type, req_names, req_off, R_COUNT);
    if (fields != fields_seen) learn_fields(fields);
    PyObject *req = type->tp_alloc(type, 0);
    if (!req) return NULL;
    PyObject *empty = PyUnicode_New(0, 0);
    Py_ssize_t q = sp1 + 1;
    while (q < sp2 && h[q] != '?') q++;
    if (!empty || set_field_str(req, R_METHOD, (const char *)h, sp1) < 0 ||
        set_field_str(req, R_PATH, (const char *)h + sp1 + 1, q - sp1 - 1) < 0 ||
        set_field_str(req, R_QUERY, (const char *)h + (q < sp2 ? q + 1 : sp2), q < sp2 ? sp2 - q - 1 : 0) < 0 ||
        req_set(req, R_COOKIE, empty) < 0 || req_set(req, R_AUTHORIZATION, empty) < 0 ||
        req_set(req, R_ORIGIN, empty) < 0 || req_set(req, R_PROTOCOLS, empty) < 0 ||
        req_set(req, R_LAST_EVENT_ID, empty) < 0 || req_set(req, R_KEY, empty) < 0 ||
        req_set(req, R_VERSION, empty) < 0 || req_set(req, R_UPGRADE, Py_False) < 0 ||
        req_set(req, R_CONNECTION_UPGRADE, Py_False) < 0 || req_set(req, R_HTTP10, http10 ? Py_True : Py_False) < 0)
        goto error;
    long seen = 0;
    Py_ssize_t i = eol + 2;
    while (i < n) {
        Py_ssize_t e = i;
        while (e < n && h[e] != '\r') e++;
        if (e == i) { /* a blank line */
            i = e + 2;
            continue;
        }
        Py_ssize_t colon = i;
        while (colon < e && h[colon] != ':') colon++;
        if (colon == e || colon == i || h[i] == ' ' || h[i] == '\t' || h[colon - 1] == ' ' || h[colon - 1] == '\t')
            goto python; /* malformed: the Python parser says so */
        long bit = field_bit(fields, h + i, colon - i);
        if (bit < 0) goto error;
        if (bit) {
            Py_ssize_t a = colon + 1, z = e;
            while (a < z && (h[a] == ' ' || h[a] == '\t')) a++;
            while (z > a && (h[z - 1] == ' ' || h[z - 1] == '\t')) z--;
            const char *v = (const char *)h + a;
            Py_ssize_t len = z - a;
            int r = 0;
            switch (bit) {
            case H_HOST:
                if (seen & H_HOST) goto python; /* duplicate */
                break;
            case H_UPGRADE:
                r = req_set(req, R_UPGRADE, has_token(h + a, len, "websocket") ? Py_True : Py_False);
                break;
            case H_CONNECTION:
                if (has_token(h + a, len, "upgrade")) r = req_set(req, R_CONNECTION_UPGRADE, Py_True);
                break;
            case H_KEY:
                if (seen & H_KEY) goto python; /* duplicate */
                r = set_field_str(req, R_KEY, v, len);
                break;
            case H_VERSION: r = set_field_str(req, R_VERSION, v, len); break;
            case H_COOKIE: r = join_field_str(req, R_COOKIE, "; ", v, len); break;
            case H_AUTHORIZATION: r = set_field_str(req, R_AUTHORIZATION, v, len); break;
            case H_ORIGIN: r = set_field_str(req, R_ORIGIN, v, len); break;
            case H_PROTOCOL: r = join_field_str(req, R_PROTOCOLS, ", ", v, len); break;
            case H_LAST_EVENT_ID: r = set_field_str(req, R_LAST_EVENT_ID, v, len); break;
            default: goto python; /* a bit this code does not know */
            }
            if (r < 0) goto error;
            seen |= bit;
        }
        i = e + 2;
    }
    PyObject *seen_obj = PyLong_FromLong(seen);
    if (!seen_obj || req_set(req, R_SEEN, seen_obj) < 0) {
        Py_XDECREF(seen_obj);
        goto error;
    }
    Py_DECREF(seen_obj);
    Py_DECREF(empty);
    return req;
python:
    Py_DECREF(req);
    Py_DECREF(empty);
    Py_RETURN_NONE;
error:
    Py_DECREF(req);
    Py_XDECREF(empty);
    return NULL;
}

/* ---- frames.Decoder, for one small frame ---------------------------------- */

/* one_frame(data, max_size) -> (opcode, payload), or None.
 *
 * What a fresh frames.Decoder makes of ``data`` when it is exactly one
 * whole, unfragmented, masked frame of at most 125 payload bytes with a
 * known opcode, and a text frame's payload valid UTF-8 (a subscribe, a
 * ping or pong, a close: nearly all a browser sends); None for anything
 * else, which the decoder then reads. */
static PyObject *py_one_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "one_frame(data, max_size)");
        return NULL;
    }
    Py_ssize_t max_size = PyLong_AsSsize_t(args[1]);
    if (max_size == -1 && PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *d = (const unsigned char *)view.buf;
    PyObject *out = NULL;
    if (view.len >= 6) {
        unsigned char b0 = d[0], b1 = d[1];
        int opcode = b0 & 0x0F;
        Py_ssize_t length = b1 & 0x7F;
        int known = opcode == 1 || opcode == 2 || opcode == 8 || opcode == 9 || opcode == 10;
        if ((b0 & 0xF0) == 0x80 && (b1 & 0x80) && length <= 125 && known && view.len == 6 + length &&
            (opcode >= 8 || length <= max_size)) {
            PyObject *payload = PyBytes_FromStringAndSize(NULL, length);
            if (payload) {
                unsigned char *w = (unsigned char *)PyBytes_AS_STRING(payload);
                const unsigned char *mask = d + 2;
                for (Py_ssize_t i = 0; i < length; i++) w[i] = d[6 + i] ^ mask[i & 3];
                int ok = 1;
                if (opcode == 1) {
                    PyObject *text = PyUnicode_DecodeUTF8((const char *)w, length, NULL);
                    if (text) {
                        Py_DECREF(text);
                    } else if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                        PyErr_Clear();
                        ok = 0; /* the decoder closes with 1007 */
                    } else {
                        Py_CLEAR(payload);
                    }
                }
                if (payload && ok) out = Py_BuildValue("(iN)", opcode, payload);
                else if (payload) Py_DECREF(payload);
                if (!out && !PyErr_Occurred()) out = Py_NewRef(Py_None);
            }
        } else {
            out = Py_NewRef(Py_None);
        }
    } else {
        out = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&view);
    return out;
}

/* ---- rawsock.accept_fd ---------------------------------------------------- */

#if defined(__linux__) && defined(SOCK_NONBLOCK) && defined(SOCK_CLOEXEC)
#define HAVE_ACCEPT_FD 1
/* accept_fd(listener_fd) -> fd: accept4() of one connection, non-blocking
 * and close-on-exec, as rawsock.accept_fd's ctypes call does, without
 * ctypes' cost per call (argument conversion, errno copies: ~0.6 µs here).
 * The listener is non-blocking (the server's), so the GIL is kept: the
 * call returns at once. Raises OSError with the errno (BlockingIOError
 * when no connection is waiting); an interrupted call is retried after the
 * signal handlers ran, as CPython's own socket calls do (PEP 475). */
static PyObject *py_accept_fd(PyObject *self, PyObject *arg) {
    long lfd = PyLong_AsLong(arg);
    if (lfd == -1 && PyErr_Occurred()) return NULL;
    if (lfd < 0 || lfd > INT_MAX) {
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (;;) {
        int fd = accept4((int)lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) return PyLong_FromLong(fd);
        if (errno != EINTR) return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0) return NULL;
    }
}
#endif

/* ---- the module -------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"event_frame", (PyCFunction)(void (*)(void))py_event_frame, METH_FASTCALL,
     "packets.event_frame for a Raw data and plain strings; None for any other case."},
    {"fast_items", (PyCFunction)(void (*)(void))py_fast_items, METH_FASTCALL, "items._fast_items."},
    {"record_loop", (PyCFunction)(void (*)(void))py_record_loop, METH_FASTCALL, "history.record's loop."},
    {"deliver_run", (PyCFunction)(void (*)(void))py_deliver_run, METH_FASTCALL, "Dispatcher.deliver's loop."},
    {"one_frame", (PyCFunction)(void (*)(void))py_one_frame, METH_FASTCALL,
     "A fresh frames.Decoder's messages for one small whole frame; None for any other input."},
    {"parse_request", (PyCFunction)(void (*)(void))py_parse_request, METH_FASTCALL,
     "handshake.parse_request for a well-formed head; None for any other."},
#ifdef HAVE_ACCEPT_FD
    {"accept_fd", (PyCFunction)py_accept_fd, METH_O, "rawsock.accept_fd: accept4() of one non-blocking connection."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "mailpush._speedups",
                                    "The fan-out path in C (see _speedups.c).", -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
#define INTERN(var, text) \
    if (!(var = PyUnicode_InternFromString(text))) return NULL
    INTERN(s_data, "data");
    INTERN(s_event, "event");
    INTERN(s_subscriber, "subscriber");
    INTERN(s_state, "state");
    INTERN(s_entries, "entries");
    INTERN(s_floor, "floor");
    INTERN(s_append, "append");
    INTERN(s_popleft, "popleft");
    INTERN(s_pop, "pop");
    INTERN(s_send, "send");
    INTERN(s_start_writer, "_start_writer");
    INTERN(s_abort, "abort");
    INTERN(s_fileno, "fileno");
    INTERN(s_sock, "sock");
    INTERN(s_queue, "queue");
    INTERN(s_events, "events");
    INTERN(s_method, "method");
    INTERN(s_path, "path");
    INTERN(s_query, "query");
    INTERN(s_cookie, "cookie");
    INTERN(s_authorization, "authorization");
    INTERN(s_origin, "origin");
    INTERN(s_protocols, "protocols");
    INTERN(s_last_event_id, "last_event_id");
    INTERN(s_key, "key");
    INTERN(s_seen, "seen");
    INTERN(s_upgrade, "upgrade");
    INTERN(s_version, "version");
    INTERN(s_connection_upgrade, "connection_upgrade");
    INTERN(s_http10, "http10");
#undef INTERN
    PyObject *msgspec = PyImport_ImportModule("msgspec");
    if (!msgspec) return NULL;
    RawType = PyObject_GetAttrString(msgspec, "Raw");
    Py_DECREF(msgspec);
    if (!RawType) return NULL;
    return PyModule_Create(&module);
}
