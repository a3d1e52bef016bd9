// End-to-end suite: the clients people really use, each talking to a real backend through a
// real wsgate process on loopback. Every step prints what it checked; a failure names the
// client, the step and what it saw. The last line is "N passed, M failed".

import { spawn, execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { WebSocketServer, WebSocket } from 'ws';
import { Server as IoServer } from 'socket.io';
import { io as ioClient } from 'socket.io-client';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const wsgateBin = process.env.WSGATE_BIN || path.join(root, 'target/debug/wsgate');
const python = process.env.E2E_PYTHON || 'python3';
const only = process.argv[2];

let passed = 0;
let failed = 0;
const children = [];

function check(client, step, ok, saw) {
  if (ok) {
    passed++;
    console.log(`ok   ${client}: ${step}`);
  } else {
    failed++;
    console.log(`FAIL ${client}: ${step} (saw: ${typeof saw === 'string' ? saw : JSON.stringify(saw)})`);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function withTimeout(promise, ms, what) {
  return Promise.race([promise, sleep(ms).then(() => { throw new Error(`timed out after ${ms} ms: ${what}`); })]);
}

async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function run(cmd, args, opts = {}) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  children.push(child);
  child.lines = [];
  child.waiters = [];
  let buf = '';
  child.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      child.lines.push(line);
      for (const w of child.waiters.splice(0)) w();
    }
  });
  child.stderrText = '';
  child.stderr.on('data', (d) => { child.stderrText += d; });
  child.waitLine = async (pred, ms, what) => withTimeout((async () => {
    for (;;) {
      const hit = child.lines.find(pred);
      if (hit) return hit;
      await new Promise((r) => child.waiters.push(r));
    }
  })(), ms, what);
  return child;
}

function certificates(dir) {
  const o = (args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  o(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
    '-keyout', 'ca-key.pem', '-out', 'ca.pem', '-subj', '/CN=wsgate e2e CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign']);
  o(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'leaf-key.pem',
    '-out', 'leaf.csr', '-subj', '/CN=localhost']);
  fs.writeFileSync(path.join(dir, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n');
  o(['x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial',
    '-days', '2', '-out', 'leaf.pem', '-extfile', 'ext.cnf']);
  // Chromium trusts exactly this key via --ignore-certificate-errors-spki-list.
  const pub = execFileSync('openssl', ['x509', '-in', 'leaf.pem', '-pubkey', '-noout'], { cwd: dir });
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: pub });
  const spki = execFileSync('openssl', ['dgst', '-sha256', '-binary'], { input: der }).toString('base64');
  return {
    ca: path.join(dir, 'ca.pem'),
    cert: path.join(dir, 'leaf.pem'),
    key: path.join(dir, 'leaf-key.pem'),
    spki,
  };
}

async function metric(adminPort, name) {
  const text = await new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port: adminPort, path: '/metrics' }, (res) => {
      let b = '';
      res.on('data', (d) => { b += d; });
      res.on('end', () => resolve(b));
    }).on('error', reject);
  });
  const line = text.split('\n').find((l) => l.startsWith(name + ' '));
  return line ? Number(line.split(' ').pop()) : 0;
}

async function waitReady(adminPort) {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise((resolve) => {
      http.get({ host: '127.0.0.1', port: adminPort, path: '/readyz' }, (res) => {
        res.resume();
        resolve(res.statusCode === 200);
      }).on('error', () => resolve(false));
    });
    if (ok) return;
    await sleep(50);
  }
  throw new Error('wsgate never became ready');
}

// A ws backend: echoes, picks the first offered subprotocol, compresses, counts connections by path.
function wsBackend(port) {
  const seen = {};
  const wss = new WebSocketServer({
    host: '127.0.0.1',
    port,
    perMessageDeflate: { threshold: 0 },
    handleProtocols: (protocols) => protocols.values().next().value ?? false,
  });
  wss.on('connection', (ws, req) => {
    const p = new URL(req.url, 'http://x').pathname;
    seen[p] = (seen[p] || 0) + 1;
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  });
  return { wss, seen };
}

// Every Cookie header any Socket.IO backend received, polling requests and upgrades alike.
const ioCookies = [];

function ioBackend(port, name, mountPath) {
  const server = http.createServer();
  server.prependListener('request', (req) => { if (req.headers.cookie) ioCookies.push(req.headers.cookie); });
  server.prependListener('upgrade', (req) => { if (req.headers.cookie) ioCookies.push(req.headers.cookie); });
  const ioServer = new IoServer(server, { path: mountPath });
  ioServer.on('connection', (socket) => {
    socket.emit('welcome', { from: name });
    socket.on('hello', (msg, ack) => ack({ from: name, echo: msg }));
  });
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve({ server, ioServer })));
}

// An ES256 key pair, its JWKS file and a token for the guarded route, with Node's own crypto.
function jwtFixture(dir) {
  const { privateKey, publicKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = { ...publicKey.export({ format: 'jwk' }), kid: 'e2e', alg: 'ES256', use: 'sig' };
  const jwks = path.join(dir, 'jwks.json');
  fs.writeFileSync(jwks, JSON.stringify({ keys: [jwk] }));
  const b64 = (x) => Buffer.from(x).toString('base64url');
  const head = b64(JSON.stringify({ alg: 'ES256', typ: 'JWT', kid: 'e2e' }));
  const body = b64(JSON.stringify({ sub: 'browser-user', exp: Math.floor(Date.now() / 1000) + 600 }));
  const sig = crypto.sign('sha256', Buffer.from(`${head}.${body}`), { key: privateKey, dsaEncoding: 'ieee-p1363' });
  return { jwks, token: `${head}.${body}.${b64(sig)}` };
}

function originServer(port, tls) {
  const server = https.createServer({ cert: fs.readFileSync(tls.cert), key: fs.readFileSync(tls.key) }, (req, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end('<!doctype html><title>wsgate e2e origin</title><p>test origin</p>');
  });
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)));
}

async function browserCase(ctx) {
  const client = 'chromium';
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', `--ignore-certificate-errors-spki-list=${ctx.tls.spki}`],
  });
  try {
    const attempt = async (originPort) => {
      const page = await browser.newPage();
      await page.goto(`https://localhost:${originPort}/`);
      const result = await page.evaluate(async (url) => new Promise((resolve) => {
        const out = { opened: false, got: [], code: null, error: false };
        const ws = new WebSocket(url);
        ws.binaryType = 'arraybuffer';
        ws.onopen = () => {
          out.opened = true;
          ws.send('hello from the browser');
          ws.send(new Uint8Array([1, 2, 3, 250]));
        };
        ws.onmessage = (e) => {
          out.got.push(typeof e.data === 'string' ? e.data : Array.from(new Uint8Array(e.data)));
          if (out.got.length === 2) ws.close(1000, 'done');
        };
        ws.onerror = () => { out.error = true; };
        ws.onclose = (e) => { out.code = e.code; resolve(out); };
        setTimeout(() => resolve(out), 8000);
      }), `wss://localhost:${ctx.gwPort}/browser`);
      await page.close();
      return result;
    };
    const good = await attempt(ctx.allowedOrigin);
    check(client, 'page from the allowed origin opens wss through wsgate', good.opened, good);
    check(client, 'text echoed', good.got[0] === 'hello from the browser', good.got);
    check(client, 'binary echoed', JSON.stringify(good.got[1]) === '[1,2,3,250]', good.got);
    check(client, 'clean close 1000', good.code === 1000, good.code);
    const before = ctx.ws.seen['/browser'] || 0;
    const bad = await attempt(ctx.otherOrigin);
    check(client, 'page from another origin is refused (the page sees the failure)', !bad.opened && bad.error && bad.code === 1006, bad);
    check(client, 'the backend saw nothing of the refused page', (ctx.ws.seen['/browser'] || 0) === before, ctx.ws.seen);

    // A route guarded by a JWT: a page of the allowed origin sets the token in a cookie (as a
    // login flow would), and the browser sends it with the WebSocket request.
    const guarded = async (token) => {
      const page = await browser.newPage();
      await page.goto(`https://localhost:${ctx.allowedOrigin}/`);
      const result = await page.evaluate(async ([url, t]) => new Promise((resolve) => {
        if (t) document.cookie = `access_token=${t}; path=/; secure; samesite=lax`;
        const out = { opened: false, got: null, code: null, error: false };
        const ws = new WebSocket(url);
        ws.onopen = () => { out.opened = true; ws.send('authenticated hello'); };
        ws.onmessage = (e) => { out.got = e.data; ws.close(1000, 'done'); };
        ws.onerror = () => { out.error = true; };
        ws.onclose = (e) => { out.code = e.code; resolve(out); };
        setTimeout(() => resolve(out), 8000);
      }), [`wss://localhost:${ctx.gwPort}/protected`, token]);
      await page.close();
      return result;
    };
    const authed = await guarded(ctx.token);
    check(client, 'a JWT in a cookie set by the allowed origin opens the guarded route', authed.opened && authed.got === 'authenticated hello', authed);
    const seenBefore = ctx.ws.seen['/protected'] || 0;
    const anon = await guarded(null);
    check(client, 'without the cookie the page sees the failure', !anon.opened && anon.error && anon.code === 1006, anon);
    check(client, 'the backend saw nothing of the unauthenticated page', (ctx.ws.seen['/protected'] || 0) === seenBefore, ctx.ws.seen);
  } finally {
    await browser.close();
  }
}

// The admin status page in Chromium: it lists the open tunnels once the token is entered, and
// the close button of one tunnel delivers that tunnel's Close frame to its client.
async function statusPageCase(ctx) {
  const client = 'status page';
  const open = async () => {
    const ws = new WebSocket(`wss://localhost:${ctx.gwPort}/watched`, { ca: fs.readFileSync(ctx.tls.ca) });
    await withTimeout(new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject); }), 10000, 'open');
    const echoed = new Promise((resolve) => ws.once('message', resolve));
    ws.send('watched');
    await withTimeout(echoed, 5000, 'echo');
    const closed = new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })));
    return { ws, port: ws._socket.localPort, closed };
  };
  const tunnels = [await open(), await open(), await open()];
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    await page.goto(`http://127.0.0.1:${ctx.adminPort}/`);
    const note = await page.locator('#tunnels').textContent();
    check(client, 'without the token the page lists no tunnels', note.includes('enter the admin token'), note);
    await page.fill('#token', ctx.adminToken);
    await page.press('#token', 'Enter');
    const target = tunnels[1];
    const row = page.locator('#tunnels tr', { hasText: `127.0.0.1:${target.port}` });
    await row.waitFor({ timeout: 10000 });
    const listed = await page.locator('#tunnels tr', { hasText: '/watched' }).count();
    check(client, 'with the token the page lists the open tunnels', listed === tunnels.length, listed);
    const backends = await page.locator('#routes').textContent();
    check(client, 'the route shows its backend and state', backends.includes(`127.0.0.1:${ctx.wsPort}`) && backends.includes('up'), backends);
    if (process.env.E2E_SCREENSHOT) await page.screenshot({ path: process.env.E2E_SCREENSHOT, fullPage: true });
    await row.locator('button', { hasText: 'close' }).click();
    const got = await withTimeout(target.closed, 10000, 'the Close from the page');
    check(client, 'closing from the page delivers that tunnel\'s Close frame', got.code === 1000 && got.reason === 'closed from the status page', got);
    const others = await Promise.race([Promise.any([tunnels[0].closed, tunnels[2].closed]), sleep(500).then(() => null)]);
    check(client, 'the other tunnels stay open', others === null, others);
    await page.close();
  } finally {
    await browser.close();
    for (const t of tunnels) t.ws.terminate();
  }
}

async function nodeWsCase(ctx) {
  const client = 'node ws';
  const url = `wss://localhost:${ctx.gwPort}/node`;
  const bytesBefore = await metric(ctx.adminPort, 'wsgate_relayed_bytes_total{direction="client_to_backend"}');
  const ws = new WebSocket(url, ['v2.chat', 'v1.chat'], { ca: fs.readFileSync(ctx.tls.ca), perMessageDeflate: { threshold: 0 } });
  await withTimeout(new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject); }), 10000, 'open');
  check(client, 'subprotocol negotiated end to end', ws.protocol === 'v2.chat', ws.protocol);
  check(client, 'permessage-deflate negotiated end to end', ws.extensions.startsWith('permessage-deflate'), ws.extensions);
  const next = () => new Promise((resolve) => ws.once('message', (data, isBinary) => resolve({ data, isBinary })));
  let m = next();
  ws.send('plain text');
  let r = await withTimeout(m, 5000, 'text echo');
  check(client, 'text echoed', !r.isBinary && r.data.toString() === 'plain text', r.data.toString());
  const bin = Buffer.from(Array.from({ length: 5000 }, (_, i) => i % 256));
  m = next();
  ws.send(bin);
  r = await withTimeout(m, 5000, 'binary echo');
  check(client, 'binary echoed', r.isBinary && Buffer.compare(r.data, bin) === 0, r.data.length);
  const big = 'compressible '.repeat(40000);
  m = next();
  ws.send(big);
  r = await withTimeout(m, 10000, 'compressed echo');
  check(client, `520 KB compressible text echoed`, r.data.toString() === big, r.data.length);
  await new Promise((resolve) => { ws.once('close', resolve); ws.close(1000, 'bye'); });
  for (let i = 0; i < 100 && (await metric(ctx.adminPort, 'wsgate_connections_open{route="/node"}')) > 0; i++) await sleep(50);
  const relayed = (await metric(ctx.adminPort, 'wsgate_relayed_bytes_total{direction="client_to_backend"}')) - bytesBefore;
  check(client, 'compressed frames passed untouched (far fewer bytes relayed than sent)', relayed > 0 && relayed < 60000, relayed);
}

async function pythonCase(ctx) {
  const client = 'python websockets';
  const c = run(python, [path.join(here, 'py_case.py'), 'client', `wss://localhost:${ctx.gwPort}/py`, ctx.tls.ca]);
  const code = await withTimeout(new Promise((resolve) => c.on('exit', resolve)), 60000, 'python client');
  const steps = c.lines.map((l) => JSON.parse(l));
  for (const s of steps) check(client, s.step, s.ok, s.saw ?? '');
  if (code !== 0 || steps.length < 6) check(client, 'client ran all steps', false, c.stderrText.slice(-800));
  const line = await ctx.py.waitLine((l) => l.includes('"code": 4000'), 5000, 'backend sees 4000').catch(() => null);
  check(client, 'backend saw the client close code 4000 and its reason', line && line.includes('client bye'), ctx.py.lines);
}

async function socketIoConnect(ctx, mount, ms, withCredentials = false) {
  const socket = ioClient(`https://localhost:${ctx.gwPort}`, {
    path: mount,
    ca: fs.readFileSync(ctx.tls.ca),
    reconnection: false,
    timeout: ms,
    // A cookie jar per client, as a browser keeps one: the sticky cookie travels with it.
    withCredentials,
  });
  const state = { welcome: null, upgraded: false, error: null, ack: null };
  socket.on('welcome', (w) => { state.welcome = w; });
  socket.on('connect_error', (e) => { state.error = e.message; });
  socket.io.engine.on('upgrade', (t) => { state.upgraded = t.name === 'websocket'; });
  // The manager opens on the first transport, before any upgrade.
  socket.io.on('open', () => { state.initialTransport = socket.io.engine.transport.name; });
  const deadline = Date.now() + ms;
  while (Date.now() < deadline && !(state.welcome && state.upgraded) && !state.error) await sleep(20);
  if (state.welcome && state.upgraded) {
    state.ack = await withTimeout(new Promise((resolve) => socket.emit('hello', 'from the client', resolve)), 5000, 'ack').catch((e) => e.message);
  }
  socket.close();
  return state;
}

async function socketIoCase(ctx) {
  const client = 'socket.io';
  const s = await socketIoConnect(ctx, '/single/socket.io/', 8000);
  check(client, 'connects with long polling first', s.initialTransport === 'polling', s);
  check(client, 'upgrades to WebSocket through the gateway', s.upgraded, s);
  check(client, 'server event reaches the client', s.welcome && s.welcome.from === 'single', s.welcome);
  check(client, 'client event reaches the server and is acknowledged', s.ack && s.ack.echo === 'from the client', s.ack);
  for (let i = 0; i < 3; i++) {
    const t = await socketIoConnect(ctx, '/sticky/socket.io/', 8000);
    check(client, `two backends with sticky = "ip_hash": client ${i + 1} polls, upgrades and exchanges events`,
      t.upgraded && t.welcome && t.ack && t.ack.from === t.welcome.from, t);
  }
  const rr = await socketIoConnect(ctx, '/rr/socket.io/', 4000);
  check(client, 'two backends without stickiness: the session breaks (polling requests reach different backends)',
    !(rr.upgraded && rr.ack && rr.ack.echo), rr);
  const sessions = await Promise.all(Array.from({ length: 20 }, () => socketIoConnect(ctx, '/cookie/socket.io/', 10000, true)));
  const working = sessions.filter((t) => t.upgraded && t.welcome && t.ack && t.ack.from === t.welcome.from);
  check(client, 'sticky = "cookie": 20 concurrent sessions from one address all poll, upgrade and exchange events', working.length === 20, sessions.filter((t) => !working.includes(t)));
  const spread = new Set(sessions.map((t) => t.welcome && t.welcome.from));
  check(client, 'sticky = "cookie": the sessions are spread over both backends', spread.size === 2, [...spread]);
  check(client, 'sticky = "cookie": no backend ever saw the sticky cookie', !ioCookies.some((c) => c.includes('wsgate_sticky')), ioCookies.slice(0, 5));
}

async function websocatCase() {
  const client = 'websocat (README example)';
  const cfg = path.join(root, 'config.example.toml');
  const echo = run(path.join(root, 'target/debug/examples/echo_backend'), []);
  await echo.waitLine((l) => l.includes('echo backend'), 10000, 'echo backend');
  const gw = run(wsgateBin, ['--config', cfg]);
  try {
    await waitReady(9090);
    // Exactly the README's command, fed one line.
    const out = execFileSync('websocat', ['--one-message', 'wss://localhost:8443/echo'], {
      cwd: root,
      input: 'hello through wsgate\n',
      env: { ...process.env, SSL_CERT_FILE: path.join(root, 'certs/localhost.pem') },
      timeout: 15000,
    }).toString();
    check(client, 'a line sent through wss://localhost:8443/echo comes back', out.trim() === 'hello through wsgate', out);
  } finally {
    gw.kill('SIGTERM');
    echo.kill();
  }
}

// A page served over HTTP/2 by wsgate opens a WebSocket to its own origin, echoes, and posts
// what it saw to /h2/report (a plain route of the same gateway, so the page needs no CORS),
// in headless Chromium and Firefox, against one gateway with websocket_over_h2 on and one
// with it off; the gateways' metrics say which protocol carried each tunnel.
function pageBackend(port) {
  const reports = [];
  const waiters = [];
  const page = `<!doctype html><title>wsgate h2 e2e</title><script>
const tag = new URLSearchParams(location.search).get('tag');
const nav = performance.getEntriesByType('navigation')[0];
const out = { tag, page: nav && nav.nextHopProtocol, opened: false, got: null, code: null, error: false };
const report = () => fetch('/h2/report', { method: 'POST', body: JSON.stringify(out) });
const ws = new WebSocket('wss://' + location.host + '/h2/ws');
ws.onopen = () => { out.opened = true; out.ext = ws.extensions; ws.send('hello over ' + tag); };
ws.onmessage = (e) => { out.got = e.data; ws.close(1000, 'done'); };
ws.onerror = () => { out.error = true; };
ws.onclose = (e) => { out.code = e.code; report(); };
setTimeout(report, 15000);
</script><p>h2 e2e</p>`;
  const server = http.createServer((req, res) => {
    if (req.method === 'POST' && req.url.startsWith('/h2/report')) {
      let b = '';
      req.on('data', (d) => { b += d; });
      req.on('end', () => {
        reports.push(JSON.parse(b));
        for (const w of waiters.splice(0)) w();
        res.writeHead(204);
        res.end();
      });
      return;
    }
    res.writeHead(200, { 'content-type': 'text/html', 'cache-control': 'no-store' });
    res.end(page);
  });
  const waitFor = (tag, ms) => withTimeout((async () => {
    for (;;) {
      const hit = reports.find((r) => r.tag === tag);
      if (hit) return hit;
      await new Promise((r) => waiters.push(r));
    }
  })(), ms, `report ${tag}`);
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve({ server, waitFor })));
}

// Firefox in a fresh profile that trusts the test CA (no WebDriver: the page reports itself).
function firefoxVisit(dir, ca, url, tag) {
  const profile = fs.mkdtempSync(path.join(dir, `ff-${tag}-`));
  execFileSync('certutil', ['-N', '-d', `sql:${profile}`, '--empty-password']);
  execFileSync('certutil', ['-A', '-d', `sql:${profile}`, '-n', 'wsgate e2e CA', '-t', 'C,,', '-i', ca]);
  fs.writeFileSync(path.join(profile, 'user.js'), [
    'user_pref("browser.shell.checkDefaultBrowser", false);',
    'user_pref("datareporting.policy.dataSubmissionEnabled", false);',
    'user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);',
    'user_pref("browser.aboutwelcome.enabled", false);',
    'user_pref("app.update.enabled", false);',
    'user_pref("network.http.http2.websockets", true);',
  ].join('\n') + '\n');
  return run('firefox-esr', ['--headless', '--no-remote', '--profile', profile, url],
    { env: { ...process.env, MOZ_HEADLESS: '1' } });
}

async function http2Case(ctx) {
  const client = 'http2 browsers';
  const [pagePort, onPort, offPort, onAdmin, offAdmin] = await Promise.all(Array.from({ length: 5 }, freePort));
  const pages = await pageBackend(pagePort);
  const gateways = [];
  try {
    for (const [port, admin, on] of [[onPort, onAdmin, true], [offPort, offAdmin, false]]) {
      const cfg = path.join(ctx.dir, `h2-${on ? 'on' : 'off'}.toml`);
      fs.writeFileSync(cfg, `[server]\nlisten = ["127.0.0.1:${port}"]\nwebsocket_over_h2 = ${on}\n` +
        `[tls]\ncert = "${ctx.tls.cert}"\nkey = "${ctx.tls.key}"\n` +
        `[limits]\nper_ip_rate = 10000\nper_ip_burst = 10000\n[admin]\nlisten = "127.0.0.1:${admin}"\n` +
        `[[routes]]\npath = "/h2/ws"\nbackends = ["127.0.0.1:${ctx.wsPort}"]\nallowed_origins = ["https://localhost:${port}"]\n` +
        `[[routes]]\npath = "/h2"\nbackends = ["127.0.0.1:${pagePort}"]\n`);
      gateways.push(run(wsgateBin, ['--config', cfg]));
      await waitReady(admin);
    }
    const carried = async (admin, protocol) =>
      metric(admin, `wsgate_connections_total{route="/h2/ws",protocol="${protocol}"}`);
    const browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', `--ignore-certificate-errors-spki-list=${ctx.tls.spki}`],
    });
    try {
      for (const [name, visit] of [
        ['chromium', async (url) => {
          const page = await browser.newPage();
          await page.goto(url);
          return { page };
        }],
        ['firefox', async (url, tag) => ({ ff: firefoxVisit(ctx.dir, ctx.tls.ca, url, tag) })],
      ]) {
        for (const [mode, port, admin] of [['on', onPort, onAdmin], ['off', offPort, offAdmin]]) {
          const tag = `${name}-${mode}`;
          const before = { h2: await carried(admin, 'h2'), http1: await carried(admin, 'http1') };
          const v = await visit(`https://localhost:${port}/h2/page?tag=${tag}`, tag);
          let r;
          try {
            r = await pages.waitFor(tag, 45000);
          } finally {
            if (v.page) await v.page.close();
            if (v.ff) v.ff.kill('SIGKILL');
          }
          check(client, `${tag}: the page came over HTTP/2`, r.page === 'h2', r.page);
          check(client, `${tag}: the WebSocket opened and echoed`, r.opened && r.got === `hello over ${tag}` && r.code === 1000, r);
          check(client, `${tag}: permessage-deflate negotiated with the backend`, (r.ext || '').includes('permessage-deflate'), r.ext);
          const after = { h2: await carried(admin, 'h2'), http1: await carried(admin, 'http1') };
          const want = mode === 'on' ? 'h2' : 'http1';
          const other = mode === 'on' ? 'http1' : 'h2';
          check(client, `${tag}: wsgate's metrics say ${want} carried it`,
            after[want] === before[want] + 1 && after[other] === before[other], { before, after });
        }
      }
    } finally {
      await browser.close();
    }
  } finally {
    for (const g of gateways) g.kill('SIGTERM');
    pages.server.close();
  }
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wsgate-e2e-'));
  const tls = certificates(dir);
  const [gwPort, adminPort, wsPort, pyPort, allowedOrigin, otherOrigin, ...ioPorts] = await Promise.all(
    Array.from({ length: 13 }, freePort));
  const ws = wsBackend(wsPort);
  const py = run(python, [path.join(here, 'py_case.py'), 'serve', String(pyPort)]);
  await py.waitLine((l) => l.includes('ready'), 15000, 'python backend');
  const ios = [
    await ioBackend(ioPorts[0], 'single', '/single/socket.io/'),
    await ioBackend(ioPorts[1], 'sticky-a', '/sticky/socket.io/'),
    await ioBackend(ioPorts[2], 'sticky-b', '/sticky/socket.io/'),
    await ioBackend(ioPorts[3], 'rr-a', '/rr/socket.io/'),
    await ioBackend(ioPorts[4], 'rr-b', '/rr/socket.io/'),
    await ioBackend(ioPorts[5], 'cookie-a', '/cookie/socket.io/'),
    await ioBackend(ioPorts[6], 'cookie-b', '/cookie/socket.io/'),
  ];
  const origins = [await originServer(allowedOrigin, tls), await originServer(otherOrigin, tls)];
  const route = (p, backends, extra = '') =>
    `[[routes]]\npath = "${p}"\nbackends = [${backends.map((b) => `"127.0.0.1:${b}"`).join(', ')}]\n${extra}\n`;
  const jwt = jwtFixture(dir);
  const adminToken = crypto.randomBytes(18).toString('base64url');
  const tokenPath = path.join(dir, 'admin.token');
  fs.writeFileSync(tokenPath, adminToken + '\n');
  const config = `[server]\nlisten = ["127.0.0.1:${gwPort}"]\n[tls]\ncert = "${tls.cert}"\nkey = "${tls.key}"\n` +
    `[limits]\nper_ip_rate = 10000\nper_ip_burst = 10000\n[admin]\nlisten = "127.0.0.1:${adminPort}"\ntoken_file = "${tokenPath}"\n` +
    `[[auth]]\nname = "e2e"\ntype = "jwt"\njwks_file = "${jwt.jwks}"\ntoken_from = ["cookie:access_token"]\nalgorithms = ["ES256"]\n` +
    route('/browser', [wsPort], `allowed_origins = ["https://localhost:${allowedOrigin}"]`) +
    route('/protected', [wsPort], `allowed_origins = ["https://localhost:${allowedOrigin}"]\nauth = "e2e"`) +
    route('/node', [wsPort], 'allow_missing_origin = true') +
    route('/watched', [wsPort], 'allow_missing_origin = true') +
    route('/py', [pyPort], 'allow_missing_origin = true') +
    route('/single', [ioPorts[0]], 'allow_missing_origin = true') +
    route('/sticky', [ioPorts[1], ioPorts[2]], 'allow_missing_origin = true\nsticky = "ip_hash"') +
    route('/rr', [ioPorts[3], ioPorts[4]], 'allow_missing_origin = true') +
    route('/cookie', [ioPorts[5], ioPorts[6]], 'allow_missing_origin = true\nsticky = "cookie"');
  const cfgPath = path.join(dir, 'wsgate.toml');
  fs.writeFileSync(cfgPath, config);
  const gw = run(wsgateBin, ['--config', cfgPath]);
  await waitReady(adminPort);
  const ctx = { dir, tls, gwPort, adminPort, wsPort, ws, py, allowedOrigin, otherOrigin, token: jwt.token, adminToken };
  const cases = [['chromium', browserCase], ['node ws', nodeWsCase], ['python websockets', pythonCase],
    ['socket.io', socketIoCase], ['websocat', websocatCase], ['status page', statusPageCase],
    ['http2 browsers', http2Case]];
  for (const [name, fn] of cases) {
    if (only && only !== name) continue;
    const started = Date.now();
    try {
      await withTimeout(fn(ctx), 120000, name);
    } catch (e) {
      check(name, 'case ran to the end', false, e.stack || String(e));
    }
    console.log(`--   ${name} took ${Date.now() - started} ms`);
  }
  gw.kill('SIGTERM');
  ws.wss.close();
  for (const s of ios) s.ioServer.close();
  for (const s of origins) s.close();
  if (failed > 0) console.log(`wsgate log (last lines):\n${gw.stderrText.split('\n').slice(-30).join('\n')}`);
}

try {
  await main();
} catch (e) {
  check('suite', 'set-up', false, e.stack || String(e));
}
for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 ? 1 : 0);
