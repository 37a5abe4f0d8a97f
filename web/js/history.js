/**
 * What a person wants to read about a finished prompt, taken from its /history entry: the positive prompt text,
 * the seed, and how long it ran. The API-format prompt is `entry.prompt[2]`; the run's messages carry timestamps
 * (execution_start to execution_success / execution_error / execution_interrupted).
 */

const TEXT_INPUTS = ["text", "text_g", "text_l", "prompt"];
const SEED_INPUTS = ["seed", "noise_seed"];
const POSITIVE_INPUTS = ["positive", "conditioning", "conditioning_1", "conditioning_to", "cond"];
const MAX_DEPTH = 8;

const isLink = (value) => Array.isArray(value) && value.length === 2 && typeof value[0] === "string";

/** A literal input of `node`, following links up to a node holding a literal under one of `names` (a primitive). */
function literal(prompt, value, names, depth = 0) {
  if (!isLink(value)) return value?.__value__ ?? value;
  const source = prompt[value[0]];
  if (!source || depth > MAX_DEPTH) return undefined;
  for (const name of [...names, "value"]) {
    if (name in (source.inputs ?? {})) return literal(prompt, source.inputs[name], names, depth + 1);
  }
  return undefined;
}

/** The text of the conditioning linked into `value`: the encoder's text, through combine/set-area nodes. */
function conditioningText(prompt, value, depth = 0) {
  if (!isLink(value) || depth > MAX_DEPTH) return undefined;
  const source = prompt[value[0]];
  if (!source) return undefined;
  for (const name of TEXT_INPUTS) {
    if (name in (source.inputs ?? {})) {
      const text = literal(prompt, source.inputs[name], TEXT_INPUTS);
      if (typeof text === "string") return text;
    }
  }
  for (const name of POSITIVE_INPUTS) {
    const text = conditioningText(prompt, source.inputs?.[name], depth + 1);
    if (text !== undefined) return text;
  }
  return undefined;
}

/** The sampler-like node: one with a `positive` input (KSampler, KSamplerAdvanced, guiders), lowest id first. */
function sampler(prompt) {
  const ids = Object.keys(prompt).sort((a, b) => Number(a) - Number(b) || a.localeCompare(b));
  return ids.map((id) => prompt[id]).find((node) => node?.inputs && "positive" in node.inputs) ?? null;
}

/** {positive, seed, seconds} of a history entry; each undefined when the prompt does not say it. */
export function summarize(entry) {
  const prompt = Array.isArray(entry?.prompt) && entry.prompt[2] && typeof entry.prompt[2] === "object" ? entry.prompt[2] : {};
  const node = sampler(prompt);
  const positive = node ? conditioningText(prompt, node.inputs.positive) : undefined;
  let seed;
  for (const candidate of [node, ...Object.values(prompt)]) {
    for (const name of SEED_INPUTS) {
      if (candidate?.inputs && name in candidate.inputs) seed ??= literal(prompt, candidate.inputs[name], SEED_INPUTS);
    }
    if (seed !== undefined) break;
  }
  const stamps = {};
  for (const [kind, data] of entry?.status?.messages ?? []) {
    if (typeof data?.timestamp === "number") stamps[kind] = data.timestamp;
  }
  const end = stamps.execution_success ?? stamps.execution_error ?? stamps.execution_interrupted;
  const seconds = stamps.execution_start !== undefined && end !== undefined ? (end - stamps.execution_start) / 1000 : undefined;
  return { positive, seed: typeof seed === "number" ? seed : undefined, seconds };
}

/** "3.2 s", "1 min 04 s". */
export function formatDuration(seconds) {
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${String(Math.round(seconds - minutes * 60)).padStart(2, "0")} s`;
}
