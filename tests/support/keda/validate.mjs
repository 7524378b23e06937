// Reads a JSON list of KEDA objects on stdin; prints a JSON list of [kind/name, error or null].
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const MODELS = { ScaledObject, TriggerAuthentication };
let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((object) => {
  const Model = MODELS[object.kind];
  const label = `${object.kind}/${object.metadata && object.metadata.name}`;
  if (!Model) return [label, `no model for ${object.apiVersion} ${object.kind}`];
  try {
    new Model(object).validate();
    return [label, null];
  } catch (error) {
    return [label, String(error.message || error)];
  }
});
console.log(JSON.stringify(results));
