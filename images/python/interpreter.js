'use strict';
// JavaScript kernel of the Warren code interpreter: one long-lived child of
// interpreter.py. Requests arrive as JSON lines on fd WARREN_REQ_FD, replies leave on
// WARREN_RESP_FD. Those are pipes of their own, so that nothing the user's code prints,
// nor any subprocess it starts with stdio 'inherit', can corrupt the protocol.
const fs = require('fs');
const net = require('net');
const path = require('path');
const readline = require('readline');
const util = require('util');
const vm = require('vm');
const { createRequire } = require('module');

const REQ_FD = Number(process.env.WARREN_REQ_FD);
const RESP_FD = Number(process.env.WARREN_RESP_FD);
// Frames of this file, of vm and of node's timer/microtask plumbing: outside the user's code.
const OUTER_FRAME = /^\s+at .*(node:vm:|node:internal\/(timers|process\/task_queues):|interpreter\.js:)/;

let current = null; // the run in progress: { id, fail(err) }
let cells = 0;

function send(msg) {
  // Synchronous, so events keep their order and nothing is lost at process.exit().
  const buf = Buffer.from(JSON.stringify(msg) + '\n');
  for (let off = 0; off < buf.length;) {
    try {
      off += fs.writeSync(RESP_FD, buf, off);
    } catch (err) {
      if (err.code !== 'EAGAIN') process.exit(1); // the parent is gone: nobody to talk to
    }
  }
}

// Everything written through process.stdout/stderr, console.* included, becomes an
// event of the run that is current when it is written.
function capture(type) {
  return function write(chunk, encoding, cb) {
    if (typeof encoding === 'function') cb = encoding;
    const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    send({ id: current && current.id, type, text });
    if (typeof cb === 'function') process.nextTick(cb);
    return true;
  };
}
process.stdout.write = capture('stdout');
process.stderr.write = capture('stderr');

function newContext() {
  const cwd = process.cwd();
  const sandbox = {
    console, process, Buffer,
    // Resolves modules from the working directory, as a script placed there would.
    require: createRequire(path.join(cwd, '[cell]')),
    module: { exports: {} },
    __filename: path.join(cwd, '[cell]'),
    __dirname: cwd,
  };
  for (const name of ['setTimeout', 'clearTimeout', 'setInterval', 'clearInterval',
    'setImmediate', 'clearImmediate', 'queueMicrotask', 'structuredClone', 'URL',
    'URLSearchParams', 'TextEncoder', 'TextDecoder', 'AbortController', 'AbortSignal',
    'EventTarget', 'Event', 'atob', 'btoa', 'performance', 'fetch', 'Headers', 'Request',
    'Response', 'FormData', 'Blob', 'MessageChannel', 'BroadcastChannel']) {
    if (name in globalThis) sandbox[name] = globalThis[name];
  }
  sandbox.exports = sandbox.module.exports;
  const context = vm.createContext(sandbox);
  sandbox.global = vm.runInContext('globalThis', context);
  return context;
}
const context = newContext();

function inspect(value) {
  try {
    return util.inspect(value);
  } catch (err) {
    return `[uninspectable value: ${err && err.message}]`;
  }
}

function describe(err, filename) {
  let name = 'Error', message, stack;
  try {
    if (err !== null && (typeof err === 'object' || typeof err === 'function') && 'message' in err) {
      name = String(err.name ?? 'Error');
      message = String(err.message);
      stack = typeof err.stack === 'string' ? err.stack : `${name}: ${message}`;
    }
  } catch { /* a hostile getter: describe it like any other thrown value */ }
  if (message === undefined) {
    message = `Uncaught ${inspect(err)}`;
    stack = message;
  }
  const lines = stack.split('\n');
  const cut = lines.findIndex((line) => OUTER_FRAME.test(line));
  stack = (cut >= 0 ? lines.slice(0, cut) : lines).join('\n');
  if (filename) {
    stack = stack.split(filename).join('<cell>');
    message = message.split(filename).join('<cell>');
  }
  return { name, message, stack, traceback: stack };
}

function compile(code, filename) {
  try {
    return new vm.Script(code, { filename });
  } catch (err) {
    if (!(err && err.name === 'SyntaxError' && /\bawait\b/.test(code))) throw err;
    // Top-level await: the cell becomes the body of an async function. To keep it
    // Jupyter-like, simple declarations at column 0 (`const x = ...`) turn into
    // assignments to globals, so they outlive the cell, and the last line is tried as the
    // return value. Both are heuristics; the plain wrapper is the fallback.
    const body = code.replace(/^(?:const|let|var)\s+(?=[A-Za-z_$][\w$]*\s*=[^=>])/gm, '');
    const lines = body.split('\n');
    let last = lines.length - 1;
    while (last > 0 && !lines[last].trim()) last--;
    const head = lines.slice(0, last).map((line) => line + '\n').join('');
    const tail = lines[last].replace(/;\s*$/, '');
    const semi = tail.lastIndexOf(';') + 1; // `await f(); x` on one line
    for (const source of [
      `(async () => {\n${head}return (${tail}\n);\n})()`,
      `(async () => {\n${head}${tail.slice(0, semi)} return (${tail.slice(semi)}\n);\n})()`,
      `(async () => {\n${body}\n})()`,
    ]) {
      try {
        return new vm.Script(source, { filename, lineOffset: -1 });
      } catch { /* next */ }
    }
    throw err;
  }
}

function isThenable(value) {
  try {
    return value !== null && (typeof value === 'object' || typeof value === 'function') &&
      typeof value.then === 'function';
  } catch {
    return false;
  }
}

async function execute({ id, code, timeout_ms: timeoutMs }) {
  const started = Date.now();
  const filename = `<cell-${++cells}>`;
  let timer = null;
  let finished = false;
  const finish = (fields) => {
    if (finished) return;
    finished = true;
    clearTimeout(timer);
    current = null;
    send({ id, type: 'end', isError: false, error: null, timedOut: false, ...fields });
  };
  const fail = (err, extra) => finish({ isError: true, error: describe(err, filename), ...extra });
  current = { id, fail };
  let value;
  try {
    const script = compile(code, filename);
    value = script.runInContext(context, {
      timeout: timeoutMs ? Math.max(1, Math.ceil(timeoutMs)) : undefined,
      breakOnSigint: true, // how the parent interrupts a run whose client went away
    });
  } catch (err) {
    return fail(err, { timedOut: Boolean(err && err.code === 'ERR_SCRIPT_EXECUTION_TIMEOUT') });
  }
  if (isThenable(value)) {
    if (timeoutMs) {
      // Pending work cannot be cancelled inside a context, so the parent restarts us.
      timer = setTimeout(() => finish({
        isError: true, timedOut: true, restart: true,
        error: describe(Object.assign(new Error(`execution timed out after ${timeoutMs} ms ` +
          'while awaiting; the JavaScript process is restarted, so its state is lost'),
        { name: 'TimeoutError', stack: undefined })),
      }), Math.max(0, timeoutMs - (Date.now() - started)));
    }
    try {
      value = await value;
    } catch (err) {
      return fail(err);
    }
  }
  if (finished) return;
  if (value !== undefined) send({ id, type: 'result', text: inspect(value) });
  finish({});
}

process.on('SIGINT', () => {
  if (current) current.fail(Object.assign(new Error('execution interrupted'), { name: 'Interrupted' }));
});
process.on('uncaughtException', (err) => {
  // During an awaited run this is almost always the run's own failure, and the run
  // would otherwise only end at its timeout.
  if (current) current.fail(err);
  else send({ id: null, type: 'stderr', text: `Uncaught ${describe(err).stack}\n` });
});
process.on('unhandledRejection', (reason) => {
  send({ id: current && current.id, type: 'stderr', text: `Uncaught (in promise) ${describe(reason).stack}\n` });
});

const input = new net.Socket({ fd: REQ_FD, readable: true, writable: false });
input.on('end', () => process.exit(0));
input.on('error', () => process.exit(0));
readline.createInterface({ input, crlfDelay: Infinity }).on('line', (line) => {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch {
    return;
  }
  if (msg.op === 'execute') {
    execute(msg).catch((err) => send({
      id: msg.id, type: 'end', isError: true, error: describe(err), timedOut: false,
    }));
  }
});
