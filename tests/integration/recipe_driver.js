// Run the node-postgres recipe as an application would, and report (see recipe_driver.py).
//   node recipe_driver.js RECIPE.js SECONDS WORKERS INTERVAL
"use strict";
const [recipePath, seconds, workers, interval] = process.argv.slice(2);
const recipe = require(require("node:path").resolve(recipePath));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const pool = recipe.openPool();
  const stats = { queries: 0, errors: [], pids: new Set(), exps: new Set(), successes: [] };
  const started = Date.now();
  const deadline = started + Number(seconds) * 1000;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      try {
        const token = await recipe.currentToken();
        const payload = JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString());
        stats.exps.add(payload.exp);
      } catch (e) { /* the workers see and count it */ }
      await sleep(50);
    }
  })();
  pool.on("error", (e) => stats.errors.push(`pool idle client error: ${e.code || ""} ${e.message}`));
  const worker = async () => {
    while (Date.now() < deadline) {
      try {
        stats.pids.add(await recipe.queryOnce(pool));
        stats.queries += 1;
        stats.successes.push(Date.now());
      } catch (e) {
        stats.errors.push(`${e.constructor.name} ${e.code || ""} ${String(e.message).split("\n")[0]}`);
      }
      await sleep(Number(interval) * 1000);
    }
  };
  await Promise.all(Array.from({ length: Number(workers) }, worker));
  const ended = Date.now();
  sampling = false;
  await sampler;
  await pool.end();
  const marks = [started, ...stats.successes.sort((a, b) => a - b), ended];
  let gap = 0;
  for (let i = 1; i < marks.length; i++) gap = Math.max(gap, marks[i] - marks[i - 1]);
  const expired = [...stats.exps].filter((e) => e * 1000 > started && e * 1000 <= ended);
  console.log(JSON.stringify({
    queries: stats.queries,
    errors: stats.errors.length,
    error_samples: [...new Set(stats.errors)].slice(0, 5),
    backends: stats.pids.size,
    tokens: stats.exps.size,
    tokens_expired_during_run: expired.length,
    seconds: (ended - started) / 1000,
    max_gap_seconds: gap / 1000,
  }));
}

main().catch((e) => { console.error(e); process.exit(1); });
