#!/usr/bin/env node
// Stream an answer from a ragmix server: node client.js [host:port] [question] [--top-k N]
// [--max-new-tokens N] [--mixture token|sequence|concat]
//
// The service definition is read from the repository's .proto at run time (no code generation),
// so this file works unchanged when fields are added to the contract.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "ragmix", "v1", "ragmix.proto");

function parseArgs(argv) {
  const args = { target: "127.0.0.1:50051", question: "What does the yield statement do?" };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--top-k") args.topK = Number(argv[++i]);
    else if (argv[i] === "--max-new-tokens") args.maxNewTokens = Number(argv[++i]);
    else if (argv[i] === "--mixture") args.mixture = argv[++i];
    else positional.push(argv[i]);
  }
  if (positional[0]) args.target = positional[0];
  if (positional[1]) args.question = positional[1];
  return args;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  // keepCase: field names as in the .proto (top_k, not topK); enums as their names.
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const ragmix = grpc.loadPackageDefinition(definition).ragmix.v1;
  const client = new ragmix.RagService(args.target, grpc.credentials.createInsecure());

  const request = {
    query: args.question,
    top_k: args.topK || 0, // 0 = server default
    mixture: args.mixture ? "MIXTURE_" + args.mixture.toUpperCase() : "MIXTURE_UNSPECIFIED",
    decoding: { max_new_tokens: args.maxNewTokens || 0 },
  };
  const call = client.Generate(request, { deadline: Date.now() + 120000 });
  let passages = [];

  call.on("data", (msg) => {
    // `event` names which member of the oneof is set: passages, then token..., then done.
    if (msg.event === "passages") {
      passages = msg.passages.passages;
    } else if (msg.event === "token") {
      process.stdout.write(msg.token.text);
    } else if (msg.event === "done") {
      const done = msg.done;
      process.stdout.write("\n\n");
      passages.forEach((p, j) => {
        const post = done.posterior[j] ?? NaN;
        console.log(`${p.id.padEnd(24)} prior ${p.prior.toFixed(3)} posterior ${post.toFixed(3)}`);
      });
      console.log(`[${done.finish_reason}, ${done.usage.generated_tokens} tokens]`);
    }
  });
  call.on("error", (err) => {
    // grpc-js names the status code; details is the server's message.
    console.error(`ragmix: ${grpc.status[err.code]}: ${err.details}`);
    process.exitCode = 1;
    client.close();
  });
  call.on("end", () => client.close());
}

main();
