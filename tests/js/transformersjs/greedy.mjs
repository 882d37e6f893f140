// Greedy generation with @huggingface/transformers (onnxruntime-node, CPU) on a local folder.
//
//   node greedy.mjs FOLDER DTYPE|default MAX_NEW_TOKENS off|config PROMPT...
//
// PENALTIES "off" disables repetition penalty and n-gram blocking; "config" keeps the folder's
// generation_config.json values, so both sides apply the same rules. Prints one JSON object:
// prompt ids, the new token ids from AutoModelForCausalLM.generate, and the text that
// pipeline('text-generation') returns, so the caller checks both entry points.
import path from 'node:path';
import { AutoModelForCausalLM, AutoTokenizer, env, pipeline } from '@huggingface/transformers';

const [folder, dtypeArg, maxNew, penalties, ...promptParts] = process.argv.slice(2);
// "default": let config.json's transformers.js_config.dtype choose the file.
const dtype = dtypeArg === 'default' ? undefined : dtypeArg;
const prompt = promptParts.join(' ');

// Local files only: the model id is the folder name under its parent directory.
env.allowRemoteModels = false;
env.useFSCache = false; // never a cached copy of another run's folder with the same name
env.localModelPath = path.dirname(path.resolve(folder));
const id = path.basename(path.resolve(folder));

const options = { max_new_tokens: Number(maxNew), do_sample: false };
if (penalties === 'off') Object.assign(options, { repetition_penalty: 1.0, no_repeat_ngram_size: 0 });

const t0 = performance.now();
const tokenizer = await AutoTokenizer.from_pretrained(id);
const model = await AutoModelForCausalLM.from_pretrained(id, { device: 'cpu', dtype });
const loadMs = performance.now() - t0;
const inputs = tokenizer(prompt);
const promptIds = Array.from(inputs.input_ids.data, Number);
const t1 = performance.now();
const out = await model.generate({ ...inputs, ...options });
const genMs = performance.now() - t1;
const ids = Array.from(out.data, Number).slice(promptIds.length);

const generator = await pipeline('text-generation', id, { device: 'cpu', dtype });
const [result] = await generator(prompt, { ...options, return_full_text: false });

console.log(
    JSON.stringify({
        prompt_ids: promptIds,
        new_ids: ids,
        pipeline_text: result.generated_text,
        load_ms: loadMs,
        generate_ms: genMs,
    }),
);
await model.dispose();
await generator.dispose();
