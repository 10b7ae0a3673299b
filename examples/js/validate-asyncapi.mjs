// Validate an AsyncAPI document with the official parser (@asyncapi/parser).
//   node validate-asyncapi.mjs asyncapi.json
// Prints one JSON line {"valid", "version", "channels", "operations", "messages", "errors",
// "warnings"}; exit code 0 when the document is valid, 1 when it is not.
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const file = process.argv[2];
if (!file) {
  console.error("usage: node validate-asyncapi.mjs FILE");
  process.exit(2);
}
const parser = new Parser();
const { document, diagnostics } = await parser.parse(await readFile(file, "utf8"));
// Spectral severities: 0 error, 1 warning, 2 info, 3 hint.
const show = (d) => `${d.code} at /${d.path.join("/")}: ${d.message}`;
const errors = diagnostics.filter((d) => d.severity === 0).map(show);
const warnings = diagnostics.filter((d) => d.severity === 1).map(show);
const summary = {
  valid: document !== undefined && errors.length === 0,
  version: document?.version(),
  channels: document ? document.channels().length : 0,
  operations: document ? document.operations().length : 0,
  messages: document ? document.components().messages().length : 0,
  errors,
  warnings,
};
console.log(JSON.stringify(summary));
process.exit(summary.valid ? 0 : 1);
