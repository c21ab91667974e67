#!/usr/bin/env python3
"""Warren code interpreter: runs Python and JavaScript cells inside the guest with
Jupyter-like persistent state, behind a small HTTP/1.1 server.

  GET  /health   -> {"ok": true, "languages": [...], "ready": bool}
  POST /execute  {"language", "code", "timeout_ms"} -> chunked NDJSON events
                 (stdout, stderr, result, file), always ending with one "end" event
  POST /reset    {"language": "python" | "javascript" | null} -> {"reset": [...]}
  POST /interrupt {"language": "python" | "javascript", "job": N} -> {"interrupted": N}
                 (N: the X-Warren-Job header of that /execute; all of the language's without)

Python cells run in the main thread, because only the main thread can be
interrupted by SIGINT (that is how a timeout becomes a KeyboardInterrupt that
leaves the interpreter and its state intact); HTTP handlers run in threads and
hand work over WORK. JavaScript runs in one node child, interpreter.js.
"""
import os

# Must precede every matplotlib import, the user's included.
os.environ["MPLBACKEND"] = "Agg"

import argparse, ast, asyncio, builtins, codecs, importlib, inspect, io, itertools  # noqa: E401
import json, linecache, queue, select, signal, socket, subprocess, sys, threading, time  # noqa: E401
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

STARTED = time.monotonic()
CAP = 64 * 1024               # largest text of one event, in UTF-8 bytes
TICK = 0.05                   # how long a partial line may wait before it is sent
MAX_BODY = 64 << 20
LANGUAGES = ["python", "javascript"]
FIG_DIR = "/tmp/figures"
PRELOAD = ("numpy", "pandas", "matplotlib", "matplotlib.pyplot")
THIS_FILE = __file__
JS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interpreter.js")
LAST = "__warren_last_value__"
MAIN_IDENT = threading.main_thread().ident
WORK = queue.Queue()          # callables for the main thread
READY = threading.Event()
RUNNING = {language: set() for language in LANGUAGES}   # jobs being streamed, for /interrupt
RUNNING_LOCK = threading.Lock()
CURRENT = None                # the Python job running in the main thread, if any
LOG_FD = SAVED_OUT = SAVED_ERR = 2


def log(msg):
    # Through a private copy of fd 2: during a run fd 2 is redirected into the run.
    try:
        os.write(LOG_FD, f"interpreter: {msg}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def split_text(text):
    """Pieces of at most CAP bytes, cut on character boundaries. Lone surrogates
    become '?' so that every line is valid UTF-8 JSON."""
    data, out = text.encode("utf-8", "replace"), []
    while len(data) > CAP:
        cut = CAP
        while data[cut] & 0xC0 == 0x80:
            cut -= 1
        out.append(data[:cut].decode())
        data = data[cut:]
    out.append(data.decode())
    return out


def plain_error(name, message):
    return {"name": name, "message": message, "traceback": f"{name}: {message}"}


def guarded(run, job):
    """A bug of ours must still end the stream, or its client would wait forever."""
    try:
        run(job)
    except BaseException as e:
        log(f"internal error: {e!r}\n{traceback.format_exc()}")
        if not job.done.is_set():
            job.end(plain_error("InternalError", f"interpreter failure: {e!r}"))


class Job:
    """One /execute: the runner puts events into `events`, the HTTP handler streams them."""

    ids = itertools.count(1)

    def __init__(self, code, timeout_ms):
        self.id = next(Job.ids)
        self.code, self.timeout_ms = code, timeout_ms
        self.events, self.done = queue.Queue(), threading.Event()
        self.stop_reason = self.t0 = None

    def start(self):
        self.t0 = time.monotonic()

    def emit(self, kind, text):
        if text:
            self.events.put({"type": kind, "text": text})

    def end(self, error=None, timed_out=False):
        ms = (time.monotonic() - self.t0) * 1000 if self.t0 else 0.0
        self.events.put({"type": "end", "isError": error is not None, "error": error,
                         "timedOut": timed_out, "durationMs": round(ms, 3)})
        self.done.set()

    def cancelled(self):
        self.end(plain_error("Cancelled", "the client went away before the code ran"))

    def tick(self):
        pass

    def request_stop(self, reason):
        if self.stop_reason is None:
            self.stop_reason = reason


class PyJob(Job):
    armed = False             # True exactly while user code runs; SIGINT is ignored otherwise
    streams = ()

    def tick(self):
        for stream in self.streams:
            stream.flush()

    def request_stop(self, reason):
        first = self.stop_reason is None
        super().request_stop(reason)
        if first:
            threading.Thread(target=self._interrupt, daemon=True).start()

    def _interrupt(self):
        # Repeated, because user code may swallow a KeyboardInterrupt with a bare except.
        while not self.done.is_set():
            if self.armed:
                signal.pthread_kill(MAIN_IDENT, signal.SIGINT)
            self.done.wait(0.5)


class JsJob(Job):
    def end(self, error=None, timed_out=False):
        if error is not None and "stack" not in error:   # JavaScript errors carry both
            error = dict(error, stack=error.get("traceback", ""))
        super().end(error, timed_out)


def on_sigint(signum, frame):
    job = CURRENT
    if job is not None and job.armed and job.stop_reason:
        raise KeyboardInterrupt


class OutStream(io.TextIOBase):
    """sys.stdout / sys.stderr during a run. Whole lines become events at once; a
    partial line waits for flush() or the handler's tick, so progress output streams."""
    encoding, errors = "utf-8", "replace"

    def __init__(self, job, kind, fd):
        super().__init__()
        self._job, self._kind, self._fd = job, kind, fd
        self._parts, self._size, self._lock = [], 0, threading.Lock()

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return self._fd           # fds 1 and 2 are captured too while the run lasts

    @property
    def buffer(self):
        return (sys.__stdout__ if self._fd == 1 else sys.__stderr__).buffer

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        with self._lock:
            self._parts.append(s)
            self._size += len(s)
            if "\n" in s or self._size >= CAP:
                self._flush()
        return len(s)

    def flush(self):
        with self._lock:
            self._flush()

    def _flush(self):
        if self._parts:
            text, self._parts, self._size = "".join(self._parts), [], 0
            self._job.emit(self._kind, text)


class FdCapture:
    """Points fds 1 and 2 into the run, so that subprocesses and C code are seen too."""

    def __init__(self, job):
        self._threads = []
        for fd, kind in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            t = threading.Thread(target=self._pump, args=(r, kind, job), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _pump(r, kind, job):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        with open(r, "rb", buffering=0) as f:
            while data := f.read(CAP):
                text = decoder.decode(data)
                if job.done.is_set():
                    log(f"{kind} after its run ended: {text[:200]!r}")
                else:
                    job.emit(kind, text)

    def close(self):
        for s in (sys.__stdout__, sys.__stderr__):
            try:
                s and s.flush()
            except Exception:
                pass
        os.dup2(SAVED_OUT, 1)
        os.dup2(SAVED_ERR, 2)
        # A background process still holding the pipe must not hold up the end event.
        for t in self._threads:
            t.join(0.5)


_figures = itertools.count(1)


def save_figures(*args, **kwargs):
    """Replaces pyplot.show: every open figure becomes a PNG and a file event."""
    plt = sys.modules.get("matplotlib.pyplot")
    for num in plt.get_fignums() if plt else ():
        fig = plt.figure(num)
        os.makedirs(FIG_DIR, exist_ok=True)
        path = f"{FIG_DIR}/figure-{next(_figures)}.png"
        try:
            fig.savefig(path, format="png")
        finally:
            plt.close(fig)
        if CURRENT is not None:
            CURRENT.events.put({"type": "file", "path": path, "mimeType": "image/png"})


save_figures.warren = True


def patch_pyplot():
    # Checked around every run, as without preloading pyplot arrives with user code.
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None and not getattr(plt.show, "warren", False):
        plt.show = save_figures


def compile_cell(code, filename):
    tree = ast.parse(code, filename)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        # The trailing expression's value is kept by an assignment rather than a
        # separate eval, so that a top-level await spans the whole cell in one coroutine.
        last = tree.body[-1]
        tree.body[-1] = ast.copy_location(
            ast.Assign(targets=[ast.Name(LAST, ast.Store())], value=last.value), last)
        ast.fix_missing_locations(tree)
    return compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                   dont_inherit=True)


class PythonKernel:
    def __init__(self):
        self.cells = 0
        self.reset()

    def reset(self):
        self.globals = {"__name__": "__main__", "__doc__": None, "__package__": None,
                        "__spec__": None, "__loader__": None, "__builtins__": builtins}
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close("all")

    def run(self, job):
        """Runs in the main thread."""
        global CURRENT
        if job.stop_reason:
            return job.cancelled()
        self.cells += 1
        # Each cell gets its own file name so that linecache shows the right source for
        # functions defined earlier; the current cell is then displayed as <cell>.
        filename = f"<cell-{self.cells}>"
        job.start()
        out, err = OutStream(job, "stdout", 1), OutStream(job, "stderr", 2)
        job.streams = (out, err)
        saved = sys.stdout, sys.stderr
        capture = FdCapture(job)
        sys.stdout, sys.stderr = out, err
        CURRENT = job
        timer = None
        if job.timeout_ms:
            timer = threading.Timer(job.timeout_ms / 1000, job.request_stop, ("timeout",))
        error = result = None
        try:
            patch_pyplot()
            code = compile_cell(job.code, filename)
            linecache.cache[filename] = (len(job.code), None, job.code.splitlines(True), filename)
            signal.signal(signal.SIGINT, on_sigint)   # in case an earlier cell replaced it
            if timer:
                timer.start()
            job.armed = True
            try:
                value = eval(code, self.globals)
                if code.co_flags & inspect.CO_COROUTINE:
                    asyncio.run(value)
                value = self.globals.pop(LAST, None)
                if value is not None:
                    result = repr(value)
            finally:
                job.armed = False
        except BaseException as e:
            error = self.describe(e, filename, job)
        finally:
            self.globals.pop(LAST, None)
            if timer:
                timer.cancel()
            try:
                patch_pyplot()
                save_figures()
            except Exception as e:
                err.write(f"could not save figures: {e!r}\n")
            CURRENT = None
            out.flush()
            err.flush()
            sys.stdout, sys.stderr = saved
            capture.close()
        if result is not None:
            job.emit("result", result)
        job.end(error, timed_out=error is not None and job.stop_reason == "timeout")

    @staticmethod
    def describe(e, filename, job):
        tb = e.__traceback__
        while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
            tb = tb.tb_next
        nodes, node = [], tb
        while node is not None:
            nodes.append(node)
            node = node.tb_next
        own = [n for n in nodes if n.tb_frame.f_code.co_filename != THIS_FILE]
        if own:
            own[-1].tb_next = None    # drops on_sigint, which raised the KeyboardInterrupt
        text = "".join(traceback.format_exception(type(e), e, tb))
        message = str(e)
        if isinstance(e, KeyboardInterrupt) and job.stop_reason == "timeout":
            message = f"execution timed out after {job.timeout_ms:g} ms"
        elif isinstance(e, KeyboardInterrupt) and job.stop_reason:
            message = f"execution interrupted ({job.stop_reason})"
        return {"name": type(e).__name__, "message": message.replace(filename, "<cell>"),
                "traceback": text.replace(f'"{filename}"', '"<cell>"')}


class NodeChild:
    def __init__(self):
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        env = dict(os.environ, WARREN_REQ_FD=str(req_r), WARREN_RESP_FD=str(resp_w))
        try:
            # Own session: a SIGINT to our process group must not reach it, and killpg
            # takes down whatever the user's code spawned.
            self.proc = subprocess.Popen(
                ["node", JS_PATH], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(req_r, resp_w), env=env,
                start_new_session=True)
        except OSError:
            os.close(req_w)
            os.close(resp_r)
            raise
        finally:
            os.close(req_r)
            os.close(resp_w)
        self.req = open(req_w, "wb", buffering=0)
        self.msgs, self.current, self.reset = queue.Queue(), None, False
        for target, args in ((self._pump_protocol, (open(resp_r, "rb"),)),
                             (self._pump_output, (self.proc.stdout, "stdout")),
                             (self._pump_output, (self.proc.stderr, "stderr"))):
            threading.Thread(target=target, args=args, daemon=True).start()
        log(f"started node, pid {self.proc.pid}")

    def _pump_protocol(self, f):
        for line in f:
            try:
                self.msgs.put(json.loads(line))
            except ValueError:
                log(f"bad message from node: {line[:200]!r}")

    def _pump_output(self, f, kind):
        # Only what bypasses process.stdout/stderr arrives here (e.g. subprocesses with
        # stdio 'inherit'); it is attributed to whatever run is current when it is read.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while data := f.read1(CAP):
            self.msgs.put({"id": self.current, "type": kind, "text": decoder.decode(data)})

    def send(self, obj):
        self.req.write((json.dumps(obj) + "\n").encode())

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        try:
            self.req.close()
        except OSError:
            pass


class JsKernel:
    def __init__(self):
        self.run_lock, self.child_lock = threading.Lock(), threading.Lock()
        self.child, self.ids = None, itertools.count(1)

    def reset(self):
        # A restart is the most thorough reset: it also ends timers, servers and
        # subprocesses left behind. A run in progress ends with an error.
        with self.child_lock:
            child, self.child = self.child, None
        if child is not None:
            child.reset = True
            child.kill()

    def _discard(self, child):
        with self.child_lock:
            if self.child is child:
                self.child = None
        child.kill()

    def warm(self):
        """Starts node ahead of the first JavaScript run (a warm pool guest should
        not make its session's first call pay for it)."""
        with self.child_lock:
            if self.child is None:
                try:
                    self.child = NodeChild()
                except OSError as e:
                    log(f"could not start node ahead of time: {e!r}")
                    return
            child = self.child
        # One empty run: node has loaded and compiled its side by the time we
        # say ready (its start-up is most of a first call's cost).
        t0 = time.monotonic()
        try:
            child.send({"id": 0, "op": "execute", "code": "undefined", "timeout_ms": 10000})
        except OSError:
            return
        deadline = t0 + 15
        while time.monotonic() < deadline:
            try:
                msg = child.msgs.get(timeout=TICK)
            except queue.Empty:
                if child.proc.poll() is not None:
                    return
                continue
            if msg.get("id") == 0 and msg.get("type") == "end":
                log(f"node ready in {time.monotonic() - t0:.2f}s")
                return

    def run(self, job):
        """Runs in a thread of its own; run_lock keeps one JavaScript run at a time."""
        with self.run_lock:
            if job.stop_reason:
                return job.cancelled()
            job.start()
            try:
                with self.child_lock:
                    if self.child is None or self.child.proc.poll() is not None:
                        self.child = NodeChild()
                    child = self.child
            except OSError as e:
                return job.end(plain_error(type(e).__name__, f"cannot start node: {e}"))
            rid = next(self.ids)
            child.current = rid
            try:
                child.send({"id": rid, "op": "execute", "code": job.code,
                            "timeout_ms": job.timeout_ms})
            except OSError:
                pass                  # noticed below as the child's exit
            try:
                self._wait(job, child, rid)
            finally:
                child.current = None

    def _wait(self, job, child, rid):
        # node enforces the timeout itself; this deadline only matters when its event
        # loop is blocked (a busy loop in a callback), and then only a kill helps.
        hard = job.t0 + job.timeout_ms / 1000 + 2.0 if job.timeout_ms else None
        exited = interrupted = None
        while True:
            try:
                msg = child.msgs.get(timeout=TICK)
            except queue.Empty:
                msg = None
            if msg is not None and msg.get("id") == rid:
                if msg.get("type") == "end":
                    if msg.get("restart"):
                        self._discard(child)
                    return job.end(msg.get("error"), bool(msg.get("timedOut")))
                if msg.get("type") in ("stdout", "stderr", "result"):
                    job.emit(msg["type"], str(msg.get("text", "")))
            elif msg is not None:
                log(f"node {msg.get('type')} outside a run: {str(msg.get('text'))[:200]!r}")
            now = time.monotonic()
            if child.proc.poll() is not None:
                exited = exited or now
                if now - exited > 0.3 and child.msgs.empty():   # let the last output drain
                    why = "was reset" if child.reset else f"exited with status {child.proc.returncode}"
                    self._discard(child)
                    return job.end(plain_error(
                        "ProcessExited", f"the JavaScript process {why}; its state is lost"))
            elif hard is not None and now > hard:
                self._discard(child)
                return job.end(plain_error(
                    "TimeoutError", f"execution timed out after {job.timeout_ms:g} ms; the "
                    "JavaScript process was killed, so its state is lost"), True)
            elif job.stop_reason and interrupted is None:
                interrupted = now
                os.kill(child.proc.pid, signal.SIGINT)        # breaks the run, keeps state
            elif interrupted is not None and now - interrupted > 2.0:
                self._discard(child)
                return job.end(plain_error("Interrupted", "the JavaScript process was killed"))


PY, JS = PythonKernel(), JsKernel()


class HttpError(Exception):
    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "warren-interpreter"
    disable_nagle_algorithm = True        # events are small and must not wait for ACKs
    ROUTES = {"/health": "GET", "/execute": "POST", "/reset": "POST", "/interrupt": "POST"}

    def dispatch(self):
        t0, self.status = time.monotonic(), "-"
        path = urlsplit(self.path).path
        try:
            try:
                body = self.read_body()
                method = self.ROUTES.get(path)
                if method is None:
                    raise HttpError(404, f"no such path: {path}")
                if self.command != method:
                    raise HttpError(405, f"{path} takes {method}, not {self.command}",
                                    {"Allow": method})
                getattr(self, "route_" + path[1:])(body)
            except HttpError as e:
                self.close_connection = True      # the body may not have been read
                self.send_json(e.status, {"error": e.message}, e.headers)
        except OSError as e:
            self.close_connection = True
            self.status = f"{self.status} (client gone: {type(e).__name__})"
        finally:
            log(f'"{self.command} {self.path}" {self.status} {(time.monotonic() - t0) * 1000:.1f}ms')

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = dispatch

    def log_request(self, code="-", size="-"):
        self.status = getattr(code, "value", code)

    def log_message(self, fmt, *args):
        log(fmt % args)

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            while True:
                try:
                    size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
                except ValueError:
                    raise HttpError(400, "malformed chunked request body")
                total += size
                if total > MAX_BODY:
                    raise HttpError(413, f"request body over {MAX_BODY} bytes")
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpError(400, "bad Content-Length")
        if n > MAX_BODY:
            raise HttpError(413, f"request body over {MAX_BODY} bytes")
        return self.rfile.read(n) if n > 0 else b""

    @staticmethod
    def parse(body, allow_empty=False):
        if allow_empty and not body.strip():
            return {}
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise HttpError(400, f"invalid JSON: {e}")
        if not isinstance(obj, dict):
            raise HttpError(400, "the body must be a JSON object")
        return obj

    def send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def route_health(self, body):
        self.send_json(200, {"ok": True, "languages": LANGUAGES, "ready": READY.is_set()})

    def route_reset(self, body):
        language = self.parse(body, allow_empty=True).get("language")
        if language is not None and language not in LANGUAGES:
            raise HttpError(400, f"unknown language {language!r}; expected one of {LANGUAGES} or null")
        languages = [language] if language else LANGUAGES
        if "python" in languages:
            done = threading.Event()

            def task():
                try:
                    PY.reset()
                finally:
                    done.set()
            WORK.put(task)
            done.wait()
        if "javascript" in languages:
            JS.reset()
        self.send_json(200, {"reset": languages})

    def route_interrupt(self, body):
        """Stops what runs in `language` (the host's client went away: the host's own
        connection to us may well stay open, so stream() cannot see it)."""
        req = self.parse(body)
        language, job_id = req.get("language"), req.get("job")
        if language not in LANGUAGES:
            raise HttpError(400, f"unknown language {language!r}; expected one of {LANGUAGES}")
        if job_id is not None and (isinstance(job_id, bool) or not isinstance(job_id, int)):
            raise HttpError(400, "job must be the number /execute sent in X-Warren-Job")
        with RUNNING_LOCK:
            # One job when named (a later one may already be queued), else all.
            jobs = [j for j in RUNNING[language] if job_id is None or j.id == job_id]
        for job in jobs:
            job.request_stop("interrupted by the client")
        self.send_json(200, {"interrupted": len(jobs)})

    def route_execute(self, body):
        req = self.parse(body)
        language, code, timeout = req.get("language"), req.get("code"), req.get("timeout_ms")
        if language is None:
            raise HttpError(400, f"missing language; expected one of {LANGUAGES}")
        if language not in LANGUAGES:
            raise HttpError(400, f"unknown language {language!r}; expected one of {LANGUAGES}")
        if not isinstance(code, str):
            raise HttpError(400, "code must be a string")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < 2**31):
            raise HttpError(400, "timeout_ms must be a positive number of milliseconds or null")
        if language == "python":
            job = PyJob(code, timeout)
            WORK.put(lambda: guarded(PY.run, job))
        else:
            job = JsJob(code, timeout)
            threading.Thread(target=guarded, args=(JS.run, job), daemon=True).start()
        with RUNNING_LOCK:
            RUNNING[language].add(job)
        try:
            self.stream(job)
        finally:
            with RUNNING_LOCK:
                RUNNING[language].discard(job)

    def stream(self, job):
        """Sends the job's events as they come. When the client goes away, the run is
        interrupted rather than left to finish: nobody would see its output, and a
        forgotten endless loop would otherwise hold the interpreter for good. Python
        state survives the interrupt (so does JavaScript state, unless its event loop is
        blocked and node has to be killed)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Warren-Job", str(job.id))
        self.end_headers()
        gone, pending, last_tick = False, None, time.monotonic()
        while True:
            event, pending = pending, None
            if event is None:
                try:
                    event = job.events.get(timeout=TICK)
                except queue.Empty:
                    pass
            if event is not None and event["type"] in ("stdout", "stderr"):
                event, pending = self.coalesce(job, event)
            now = time.monotonic()
            if now - last_tick >= TICK:
                job.tick()
                last_tick = now
            if event is None:
                if not gone and self.peer_closed():
                    gone = True
                    job.request_stop("client disconnected")
                continue
            if not gone:
                try:
                    self.send_event(event)
                except OSError:
                    gone = True
                    job.request_stop("client disconnected")
            if event["type"] == "end":
                break
        if gone:
            self.close_connection = True
            self.status = f"{self.status} (client gone)"
        else:
            self.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def coalesce(job, event):
        """Merges output already queued, so a fast print loop costs few lines."""
        parts, size = [event["text"]], len(event["text"])
        while size < CAP:
            try:
                nxt = job.events.get_nowait()
            except queue.Empty:
                break
            if nxt["type"] != event["type"]:
                return {"type": event["type"], "text": "".join(parts)}, nxt
            parts.append(nxt["text"])
            size += len(nxt["text"])
        return {"type": event["type"], "text": "".join(parts)}, None

    def send_event(self, event):
        pieces = split_text(event["text"]) if "text" in event else [None]
        for piece in pieces:
            if piece is not None:
                event = dict(event, text=piece)
            line = (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8", "replace")
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))   # one chunk per line

    def peer_closed(self):
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        log(f"error serving {client_address}: {traceback.format_exc()}")


def setup_fds():
    global LOG_FD, SAVED_OUT, SAVED_ERR
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(null, fd)
    os.dup2(null, 0)          # user code must never block reading the guest's console
    if null > 2:
        os.close(null)
    LOG_FD, SAVED_OUT, SAVED_ERR = os.dup(2), os.dup(1), os.dup(2)


def preload():
    for name in PRELOAD:
        t0 = time.monotonic()
        try:
            importlib.import_module(name)
        except Exception as e:
            log(f"could not preload {name}: {e!r}")
        else:
            log(f"preloaded {name} in {time.monotonic() - t0:.2f}s")
    patch_pyplot()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8421)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--no-preload", action="store_true")
    args = parser.parse_args()
    setup_fds()
    workdir = "/workspace" if os.path.isdir("/workspace") else "/tmp"
    os.chdir(workdir)
    sys.path[0] = ""          # user modules in the working directory, not ours
    signal.signal(signal.SIGINT, on_sigint)
    server = Server((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log(f"listening on http://{args.host}:{args.port}, working directory {workdir}")
    if not args.no_preload:
        preload()
        JS.warm()
    READY.set()
    log(f"ready after {time.monotonic() - STARTED:.2f}s")
    while True:
        task = WORK.get()
        try:
            task()
        except BaseException as e:    # e.g. a stray KeyboardInterrupt: the server must live on
            log(f"internal error: {e!r}\n{traceback.format_exc()}")


if __name__ == "__main__":
    main()
