#!/usr/bin/env node
// Runs one styleblend Blend through a running gateway: progress on stdout, previews and the
// result on disk. It loads the public .proto at run time, so there is nothing to generate.
//
//   node clients/node/blend.js --gateway HOST:PORT \
//     --source photo.jpg:content=1 --source starry.jpg:style=1 -o out.png \
//     [--size PX] [--iterations N] [--seed N] [--previews DIR] [--preview-every N] [--token T]

import { mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTOS = fileURLToPath(new URL("../../protos", import.meta.url));
const MiB = 1024 * 1024;
const WEIGHTS = { style: "style_weight", content: "content_weight" };
const MAPS = { mask: "style_map", "content-mask": "content_map" };

const USAGE = `usage: node blend.js --source PATH[:style=W][:content=W][:mask=PATH][:content-mask=PATH] ...
                     -o OUT.png [--gateway HOST:PORT] [--size PX] [--iterations N] [--seed N]
                     [--previews DIR] [--preview-every N] [--token TOKEN]

A weight you leave out counts as 0; each source needs at least one.
--gateway defaults to $STYLEBLEND_GATEWAY, else $STYLEBLEND_HOST:$STYLEBLEND_GATEWAY_PORT
(127.0.0.1:50051), as for the Python CLI. --token (default $STYLEBLEND_TOKEN) is sent as
\`authorization: Bearer TOKEN\` to a gateway that asks for one.`;

/** A mistake on the command line: exit status 2, as argparse does. */
class UsageError extends Error {}

function defaultGateway() {
  const host = process.env.STYLEBLEND_HOST ?? "127.0.0.1";
  return process.env.STYLEBLEND_GATEWAY ?? `${host}:${process.env.STYLEBLEND_GATEWAY_PORT ?? 50051}`;
}

function weight(text, key, value) {
  // Number("") is 0, so a bare `style=` must be caught before it.
  const w = value.trim() === "" ? Number.NaN : Number(value);
  if (Number.isNaN(w)) throw new UsageError(`${text}: ${key}=${JSON.stringify(value)} is not a number`);
  if (!Number.isFinite(w) || w < 0) throw new UsageError(`${text}: ${key} must be a finite number >= 0`);
  return w;
}

function file(text, path) {
  let stat;
  try {
    stat = statSync(path);
  } catch {
    stat = null;
  }
  if (!stat?.isFile()) throw new UsageError(`${text}: ${path}: no such file`);
  return path;
}

/** `photo.jpg:content=1`, `starry.jpg:style=0.7:mask=left.png`; the rule of clients/cli/sources.py. */
function parseSource(text) {
  const parts = text.split(":");
  const weights = {};
  const maps = {};
  while (parts.length > 1 && parts.at(-1).includes("=")) {
    const part = parts.pop();
    const key = part.slice(0, part.indexOf("="));
    const value = part.slice(part.indexOf("=") + 1);
    if (key in WEIGHTS) weights[WEIGHTS[key]] = weight(text, key, value);
    else if (key in MAPS) maps[MAPS[key]] = file(text, value);
    else {
      throw new UsageError(
        `${text}: unknown option ${JSON.stringify(key)}; use style=, content=, mask= or content-mask=`,
      );
    }
  }
  const path = parts.join(":");
  if (Object.keys(weights).length === 0) {
    throw new UsageError(`${text}: give a weight, e.g. ${path}:style=1 or :content=1`);
  }
  return { path: file(text, path), style_weight: 0, content_weight: 0, ...weights, ...maps };
}

function count(name, text, max = 2 ** 32 - 1) {
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text) || BigInt(text) > BigInt(max)) {
    throw new UsageError(`--${name}: ${JSON.stringify(text)} is not a whole number in 0..${max}`);
  }
  return text;
}

function parseCommandLine(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        gateway: { type: "string", default: defaultGateway() },
        source: { type: "string", multiple: true, default: [] },
        output: { type: "string", short: "o" },
        size: { type: "string" },
        iterations: { type: "string" },
        seed: { type: "string" },
        previews: { type: "string" },
        "preview-every": { type: "string" },
        token: { type: "string", default: process.env.STYLEBLEND_TOKEN ?? "" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
      allowPositionals: false,
    }).values;
  } catch (error) {
    throw new UsageError(error.message);
  }
  if (parsed.help) return { help: true };
  if (!parsed.output) throw new UsageError("-o OUT.png is required");
  if (parsed.source.length === 0) throw new UsageError("give at least one --source");
  return {
    gateway: parsed.gateway,
    sources: parsed.source.map(parseSource),
    output: parsed.output,
    size: Number(count("size", parsed.size) ?? 0),
    iterations: Number(count("iterations", parsed.iterations) ?? 0),
    seed: count("seed", parsed.seed, 2n ** 64n - 1n), // uint64: sent as a string (longs: String)
    previews: parsed.previews,
    previewEvery: Number(count("preview-every", parsed["preview-every"]) ?? 0),
    token: parsed.token,
  };
}

function blendRequest(args) {
  const image = (path) => ({ data: readFileSync(path) });
  const request = {
    // Both weights are proto3 `optional` and the gateway requires them set, so they are always
    // sent, 0 included.
    sources: args.sources.map((source) => ({
      data: readFileSync(source.path),
      style_weight: source.style_weight,
      content_weight: source.content_weight,
      ...(source.style_map && { style_map: image(source.style_map) }),
      ...(source.content_map && { content_map: image(source.content_map) }),
    })),
    max_side_px: args.size, // 0 = the gateway's default
    iterations: args.iterations,
    preview_every: args.previewEvery, // 0 = the gateway's default (every 10)
  };
  if (args.seed !== undefined) request.seed = args.seed;
  return request;
}

function loadStyleBlend() {
  const definition = protoLoader.loadSync("styleblend/v1/styleblend.proto", {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true, // `event.event` names the member of the oneof that is set
  });
  return grpc.loadPackageDefinition(definition).styleblend.v1.StyleBlend;
}

function progressLine(progress) {
  const { losses } = progress;
  // Like printf's %.4g: losses span many orders of magnitude.
  const g = (x) => {
    const a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(3) : String(Number(x.toPrecision(4)));
  };
  return (
    `iteration ${progress.iteration}/${progress.iterations_total}` +
    ` scale ${progress.scale + 1}/${progress.scales_total}` +
    ` ${progress.width_px}×${progress.height_px}` +
    ` style ${g(losses.style)} content ${g(losses.content)} tv ${g(losses.tv)} total ${g(losses.total)}` +
    ` ${progress.iterations_per_second.toFixed(2)} it/s`
  );
}

/** The server's message for a person, with what to do when there is no gateway at all. */
function explain(error, gateway) {
  const name = grpc.status[error.code] ?? "UNKNOWN";
  // The gateway says "the … service at ADDRESS is unavailable" when one of *its* upstreams is
  // down; any other UNAVAILABLE means we never reached a gateway.
  if (error.code === grpc.status.UNAVAILABLE && !(error.details ?? "").includes("service at")) {
    return (
      `error (UNAVAILABLE): no styleblend gateway is reachable at ${gateway} (${error.details}).\n` +
      "Start one with `styleblend up` (or pass --gateway HOST:PORT)."
    );
  }
  if (error.code === grpc.status.UNAUTHENTICATED) {
    return `error (UNAUTHENTICATED): ${error.details}\nPass --token TOKEN or set STYLEBLEND_TOKEN.`;
  }
  return `error (${name}): ${error.details}`;
}

function blend(args) {
  const StyleBlend = loadStyleBlend();
  const client = new StyleBlend(args.gateway, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": 256 * MiB,
    "grpc.max_send_message_length": 256 * MiB,
  });
  if (args.previews) mkdirSync(args.previews, { recursive: true });
  mkdirSync(dirname(args.output), { recursive: true });

  return new Promise((resolve) => {
    let result = null;
    let cancelled = false;
    let status = null; // the exit status, once known; grpc-js emits "end" after "error" too
    const metadata = new grpc.Metadata();
    if (args.token) metadata.set("authorization", `Bearer ${args.token}`);
    const call = client.Blend(blendRequest(args), metadata);
    const settle = (code, message) => {
      if (status !== null) return;
      status = code;
      if (message) console.error(message);
      call.cancel(); // a no-op once the call has ended; stops the run when we failed locally
      client.close();
      resolve(code);
    };
    // Ctrl-C cancels the call, and the gateway stops the optimisation within one iteration.
    process.once("SIGINT", () => {
      cancelled = true;
      settle(130, "cancelled");
    });
    call.on("data", ({ event }) => {
      try {
        if (event.event === "progress") {
          console.log(progressLine(event.progress));
        } else if (event.event === "preview" && args.previews) {
          const name = `preview_${String(event.preview.iteration).padStart(5, "0")}.jpg`;
          writeFileSync(join(args.previews, name), event.preview.image);
        } else if (event.event === "result") {
          result = event.result;
        }
      } catch (error) {
        settle(1, `error: ${error.message}`); // e.g. the previews folder is not writable
      }
    });
    call.on("error", (error) => {
      settle(1, cancelled ? null : explain(error, args.gateway));
    });
    call.on("end", () => {
      if (status !== null) return;
      if (result === null) {
        settle(1, "error: the gateway ended the stream without a result");
        return;
      }
      try {
        // The gateway's PNG already carries the recipe (iTXt `styleblend:recipe`).
        writeFileSync(args.output, result.image);
      } catch (error) {
        settle(1, `error: ${error.message}`);
        return;
      }
      const { stats } = result;
      console.log(
        `wrote ${args.output} (${result.width_px}×${result.height_px}, ` +
          `${stats.iterations} iterations in ${stats.seconds.toFixed(1)} s)` +
          (args.previews ? `; previews in ${args.previews}` : ""),
      );
      settle(0);
    });
  });
}

async function main(argv) {
  let args;
  try {
    args = parseCommandLine(argv);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`error: ${error.message}\n(node blend.js --help for usage)`);
    return 2;
  }
  if (args.help) {
    console.log(USAGE);
    return 0;
  }
  try {
    return await blend(args);
  } catch (error) {
    // Files that vanish or cannot be written: a message, not a stack trace.
    console.error(`error: ${error.message}`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
