#!/usr/bin/env bash
# Runs the reference hub's Playwright conformance suite (dunglas/mercure, conformance-tests/,
# tag v0.24.2) against our embedded hub, in Debian's chromium (never a downloaded browser).
#
#   mercure/conformance/run-reference-suite.sh /path/to/mercure-checkout/conformance-tests
#
# TRANSPORT=local (the default here) or TRANSPORT=jetstream: the hub's transport; jetstream
# starts a nats-server of its own ($DATAVIZ_NATS_SERVER, else .local/venv/bin/nats-server).
# Needs: chromium (apt), node and npm. The suite is not vendored here (AGPL); pass a checkout.
set -euo pipefail
suite=${1:?usage: $0 /path/to/dunglas-mercure/conformance-tests}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'kill "${hub_pid:-}" "${nats_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

port=${PORT:-39311}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
cargo build -q -p dataviz-mercure --example hub
transport=${TRANSPORT:-local}
nats_port=$((port + 1))
if [ "$transport" = jetstream ]; then
  "${DATAVIZ_NATS_SERVER:-$root/.local/venv/bin/nats-server}" -a 127.0.0.1 -p "$nats_port" -js -sd "$work/nats" &
  nats_pid=$!
  for _ in $(seq 50); do (echo > "/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break; sleep 0.1; done
fi
# The suite signs with the reference hub's default key.
# Its subscribe cases run without a token, as the reference hub's development config allows.
MERCURE_TRANSPORT=$transport NATS_URL=nats://127.0.0.1:$nats_port \
MERCURE_ANONYMOUS=true MERCURE_ADDR=127.0.0.1:$port MERCURE_PUBLISHER_JWT_KEY='!ChangeThisMercureHubJWTSecretKey!' \
  "$CARGO_TARGET_DIR/debug/examples/hub" &
hub_pid=$!

cp "$suite/mercure.spec.ts" "$work/"
cat > "$work/playwright.config.ts" <<'CONFIG'
import type { PlaywrightTestConfig } from "@playwright/test";
const config: PlaywrightTestConfig = {
  testDir: "./.",
  timeout: 10 * 1000,
  expect: { timeout: 5000 },
  workers: 1,
  reporter: "list",
  use: {
    baseURL: process.env.BASE_URL,
    launchOptions: { executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] },
  },
  projects: [{ name: "chromium" }],
};
export default config;
CONFIG
cd "$work"
echo '{"name":"conformance","version":"1.0.0","private":true}' > package.json
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund @playwright/test@1.59.1 dotenv@17
BASE_URL=http://127.0.0.1:$port/.well-known/mercure CUSTOM_ID=1 npx playwright test
