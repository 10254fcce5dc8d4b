// npm's `pretest`: builds the proxy binary the test runs (debug profile, which
// `cargo test` has mostly built already), unless PORTCULLIS_BIN names one.
import { spawnSync } from 'node:child_process';
import { REPO } from '../lib/proxy.js';

if (process.env.PORTCULLIS_BIN) {
  console.log(`using PORTCULLIS_BIN=${process.env.PORTCULLIS_BIN}`);
} else {
  const r = spawnSync('cargo', ['build', '--bin', 'portcullis'], { cwd: REPO, stdio: 'inherit' });
  if (r.error || r.status !== 0) {
    console.error(`cargo build failed: ${r.error ?? `exit ${r.status}`}`);
    process.exit(1);
  }
}
