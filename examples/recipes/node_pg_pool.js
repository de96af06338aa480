// node-postgres Pool with a password function: a current token for every new connection.
//
// Connection settings come from PGHOST, PGPORT, PGUSER and PGDATABASE (read by pg) and
// PGSSLROOTCERT (the CA that signed the proxy's certificate); the token from the command
// in JWTPG_TOKEN_COMMAND (e.g. `jwt-postgresql-proxy token --key key.pem --sub app --ttl 5m`,
// or your identity provider's CLI), run again JWTPG_REFRESH_MARGIN seconds before its exp.
"use strict";
const { execFile } = require("node:child_process");
const fs = require("node:fs");
const { Pool } = require("pg");

const REFRESH_MARGIN_SECONDS = Number(process.env.JWTPG_REFRESH_MARGIN || 60);
// Below the time a new connection's token has left at least (the refresh margin above).
const MAX_LIFETIME_SECONDS = Number(process.env.POOL_MAX_LIFETIME_SECONDS || 45);

let cached = null; // { token, exp }
let pending = null; // one command at a time

function runTokenCommand() {
  const [file, ...args] = process.env.JWTPG_TOKEN_COMMAND.trim().split(/\s+/);
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout: 30000 }, (error, stdout) => {
      // Never include stdout in the error: it may hold a token.
      if (error) return reject(new Error(`token command ${file} failed: ${error.code ?? error.signal}`));
      const token = stdout.trim();
      const payload = JSON.parse(Buffer.from(token.split(".")[1] || "", "base64url").toString() || "{}");
      resolve({ token, exp: typeof payload.exp === "number" ? payload.exp : Date.now() / 1000 + 300 });
    });
  });
}

async function currentToken() {
  if (cached && Date.now() / 1000 < cached.exp - REFRESH_MARGIN_SECONDS) return cached.token;
  pending ??= runTokenCommand().finally(() => { pending = null; });
  cached = await pending;
  return cached.token;
}

function openPool() {
  const pool = new Pool({
    password: currentToken, // called for each new connection
    maxLifetimeSeconds: MAX_LIFETIME_SECONDS,
    max: 4,
    ssl: { ca: fs.readFileSync(process.env.PGSSLROOTCERT), rejectUnauthorized: true },
  });
  // An idle client's error (e.g. the proxy ended its session) must be handled, or node
  // exits; the pool has already discarded that client.
  pool.on("error", (error) => console.warn(`idle database client: ${error.message}`));
  return pool;
}

async function queryOnce(pool) {
  const result = await pool.query("select pg_backend_pid() as pid");
  return result.rows[0].pid;
}

module.exports = { openPool, queryOnce, currentToken };
