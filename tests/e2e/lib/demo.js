// Starts `portcullis demo` as a newcomer does and reads what it prints: the
// page to open, the demo user and password, the identity provider.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';

import { portcullisBin } from './proxy.js';

/** The banner's fields; throws naming the line that is missing. */
export function parseBanner(text) {
  const pick = (re, what) => {
    const m = re.exec(text);
    if (!m) throw new Error(`the demo's banner has no ${what}:\n${text}`);
    return m.slice(1);
  };
  const [url] = pick(/open (http:\/\/\S+)/, 'URL to open');
  const [user, password] = pick(/sign in as (\S+) with password (\S+)/, 'user and password');
  const [idp] = pick(/identity provider\s+(http:\/\/\S+?)\/?\s/, 'identity provider');
  const [api] = pick(/echo API\s+(http:\/\/\S+?)\/?\s/, 'echo API');
  const [admin] = pick(/metrics\s+(http:\/\/\S+?)\/metrics/, 'metrics URL');
  const [ttl] = pick(/access tokens live (\d+) s/, 'access token lifetime');
  return { url, user, password, idp, api, admin, ttl: Number(ttl) };
}

/**
 * `portcullis demo --port <port>`; resolves once the banner is out and the
 * proxy is ready (its admin `/readyz`: the demo IdP's keys loaded).
 */
export async function startDemo({ port, env = {}, logFile }) {
  const child = spawn(portcullisBin(), ['demo', '--port', String(port)], {
    env: { ...process.env, ...env, PORTCULLIS_LOG: process.env.PORTCULLIS_LOG ?? 'info', NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const log = logFile ? fs.createWriteStream(logFile) : null;
  let stdout = '';
  let text = '';
  child.stdout.on('data', (b) => {
    stdout += b;
    text += b;
    log?.write(b);
  });
  child.stderr.on('data', (b) => {
    text += b;
    log?.write(b);
  });
  let exited = null;
  const exit = new Promise((resolve) =>
    child.once('exit', (code, signal) => {
      exited = { code, signal };
      resolve(exited);
    }),
  );
  const killOnExit = () => child.kill('SIGKILL');
  process.once('exit', killOnExit);

  const fail = (why) => {
    child.kill('SIGKILL');
    process.removeListener('exit', killOnExit);
    return new Error(`${why}:\n${text}`);
  };
  const deadline = Date.now() + 30_000;
  // The banner's last line names Ctrl-C.
  while (!/Ctrl-C/.test(stdout)) {
    if (exited) throw fail(`portcullis demo exited during start (${JSON.stringify(exited)})`);
    if (Date.now() > deadline) throw fail('no banner from portcullis demo within 30 s');
    await new Promise((r) => setTimeout(r, 50));
  }
  const banner = parseBanner(stdout);
  for (;;) {
    const ok = await fetch(`${banner.admin}/readyz`, { signal: AbortSignal.timeout(1000) })
      .then((r) => r.status === 200)
      .catch(() => false);
    if (ok) break;
    if (exited) throw fail(`portcullis demo exited during start (${JSON.stringify(exited)})`);
    if (Date.now() > deadline) throw fail('portcullis demo not ready within 30 s');
    await new Promise((r) => setTimeout(r, 100));
  }

  return {
    banner,
    log: () => text,
    /** The demo IdP's counters (`/stats`). */
    stats: async () => (await fetch(`${banner.idp}/stats`, { signal: AbortSignal.timeout(5000) })).json(),
    /** SIGTERM (as Ctrl-C would), then SIGKILL after 10 s. */
    stop: async () => {
      process.removeListener('exit', killOnExit);
      if (!exited) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      const result = await exit;
      clearTimeout(timer);
      log?.end();
      return result;
    },
  };
}

/** Whether something accepts connections on `url`'s host and port now. */
export function listening(url) {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    const s = net.connect({ host: hostname, port: Number(port) });
    s.setTimeout(2000);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('timeout', () => {
      s.destroy();
      resolve(true); // not refused: something holds the port
    });
    s.once('error', () => resolve(false));
  });
}
