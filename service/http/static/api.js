// The service's HTTP API as the page calls it: JSON both ways, same origin only. The API
// token lives in this module's memory and nowhere else (no storage, no cookie): a reload
// forgets it.

let token = null;

/** Use `value` as the bearer token of the verb requests (empty: none). */
export function setToken(value) {
  token = value ? value.trim() : null;
}

/** A refused or failed request: the HTTP status and the service's `error` text as is. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function decode(response) {
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body && typeof body.error === "string"
      ? body.error : `${response.status} ${response.statusText}`.trim();
    throw new ApiError(response.status, message);
  }
  if (body === null) throw new ApiError(response.status, "the service's answer is not JSON");
  return body;
}

/** GET a JSON document of this service. */
export async function getJSON(path) {
  return decode(await fetch(path, {headers: {accept: "application/json"}, cache: "no-store"}));
}

/** POST one verb request; `{answer, ms}`, ms the round trip as the browser saw it. */
export async function callVerb(verb, body) {
  const headers = {"content-type": "application/json", accept: "application/json"};
  if (token) headers.authorization = `Bearer ${token}`;
  const started = performance.now();
  const response = await fetch(`/${verb}`, {method: "POST", headers, body, cache: "no-store"});
  const answer = await decode(response);
  return {answer, ms: performance.now() - started};
}
