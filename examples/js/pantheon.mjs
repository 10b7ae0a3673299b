// Pantheon-ES from JavaScript, with nothing but the official NATS client.
//
//   node pantheon.mjs --server nats://127.0.0.1:4222 [--tenant default] [--namespace pantheon]
//                     [--name js-hello] [--argv 'echo hello from js'] [--until completed]
//                     [--timeout 60]
//
// 1. submits a task: a request on pantheon.cmd.<tenant>.task.submit, prints the reply;
// 2. watches the task's current state in the KV bucket pantheon-state (key
//    <tenant>.task.<id>) until its status is --until (exit 1 if it ends in another one);
// 3. follows the task's raw events on the stream PANTHEON_EVENTS (subject
//    pantheon.ev.<tenant>.task.<id>) with an ordered consumer, from its first event to its
//    terminal one.
// Output: one line per step, "<what> <json>", so a person and a test can both read it.
// The contract of every subject: `pantheon schema --asyncapi` (docs/other-languages.md).
import { parseArgs } from "node:util";
import { connect } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";

const { values: opt } = parseArgs({
  options: {
    server: { type: "string", default: process.env.PANTHEON_NATS_URL ?? "nats://127.0.0.1:4222" },
    tenant: { type: "string", default: process.env.PANTHEON_TENANT ?? "default" },
    namespace: { type: "string", default: process.env.PANTHEON_NAMESPACE ?? "pantheon" },
    name: { type: "string", default: "js-hello" },
    argv: { type: "string", default: "echo hello from js" },
    until: { type: "string", default: "completed" },
    timeout: { type: "string", default: "60" },
  },
});
const root = opt.namespace;
const tenant = opt.tenant;
const timeoutMs = Number(opt.timeout) * 1000;
const TERMINAL_STATES = new Set(["completed", "failed", "cancelled", "timed_out"]);
const TERMINAL_EVENTS = new Set(["TaskCompleted", "TaskFailed", "TaskCancelled", "TaskTimedOut"]);
// The stream and bucket names follow the namespace: pantheon -> PANTHEON_EVENTS, pantheon-state.
const stream = `${root.toUpperCase().replaceAll("-", "_")}_EVENTS`;
const bucket = `${root}-state`;

const show = (what, value) => console.log(`${what} ${JSON.stringify(value)}`);

function deadline(what) {
  let timer;
  const promise = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${opt.timeout}s: ${what}`)), timeoutMs);
  });
  return { promise, cancel: () => clearTimeout(timer) };
}

// 1. A command is a core NATS request with a JSON body; the reply is {"ok": ..}.
async function submit(nc) {
  const body = {
    name: opt.name,
    executor: { kind: "shell", argv: opt.argv.split(" ").filter(Boolean) },
    labels: { client: "js" },
    actor: "js:pantheon-example", // recorded on the events; optional
  };
  const msg = await nc.request(`${root}.cmd.${tenant}.task.submit`, JSON.stringify(body), {
    timeout: 10_000,
  });
  const reply = msg.json();
  show("reply", reply);
  if (!reply.ok) {
    // A typed error: code from the closed set (invalid, overloaded, ...), message, details.
    throw Object.assign(new Error(`${reply.error.code}: ${reply.error.message}`), { reply });
  }
  return reply.result.task_id;
}

// 2. The KV watch gives the current value of the key first, then every change, in order.
async function watchState(kv, taskId) {
  const watch = await kv.watch({ key: `${tenant}.task.${taskId}` });
  let last = null;
  try {
    for await (const entry of watch) {
      if (entry.operation !== "PUT") continue; // DEL/PURGE: the entity was removed
      const state = entry.json();
      if (state.status !== last) {
        last = state.status;
        show("state", { status: state.status, revision: entry.revision, attempt: state.attempt });
      }
      if (state.status === opt.until) return state;
      if (TERMINAL_STATES.has(state.status)) {
        throw new Error(`task ended ${state.status}, not ${opt.until}: ${JSON.stringify(state.error)}`);
      }
    }
  } finally {
    watch.stop();
  }
  throw new Error("the KV watch ended");
}

// 3. The raw event feed of one task: an ordered consumer on its subject, from the start
//    (deliver_policy "all"; "by_start_sequence" with opt_start_seq, or "by_start_time" with
//    opt_start_time, start elsewhere). Other filters: pantheon.ev.<tenant>.> (a tenant),
//    pantheon.ev.*.task.* (every task).
async function followEvents(js, taskId) {
  const consumer = await js.consumers.get(stream, {
    filter_subjects: [`${root}.ev.${tenant}.task.${taskId}`],
    deliver_policy: "all",
  });
  const messages = await consumer.consume();
  const seen = [];
  try {
    for await (const m of messages) {
      const event = m.json();
      seen.push(event.type);
      show("event", {
        seq: m.seq,
        type: event.type,
        msg_id: m.headers?.get("Nats-Msg-Id"),
        actor: event.actor,
        occurred_at: event.occurred_at,
      });
      if (TERMINAL_EVENTS.has(event.type)) return seen;
    }
  } finally {
    await messages.close();
  }
  throw new Error("the event feed ended");
}

const nc = await connect({ servers: opt.server.split(","), name: "pantheon-js-example" });
let code = 0;
try {
  const js = jetstream(nc);
  const kv = await new Kvm(nc).open(bucket);
  const taskId = await submit(nc);
  show("task_id", taskId);
  const limit = deadline(`task ${taskId} to reach ${opt.until}`);
  try {
    const [state, events] = await Promise.race([
      Promise.all([watchState(kv, taskId), followEvents(js, taskId)]),
      limit.promise,
    ]);
    show("final", { task_id: taskId, status: state.status, result: state.result, events });
  } finally {
    limit.cancel();
  }
} catch (error) {
  console.error(`error: ${error.message}`);
  code = 1;
} finally {
  await nc.drain();
}
process.exit(code);
