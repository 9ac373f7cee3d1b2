// A client for the users service written against nothing but the types that
// openapi-typescript generates from the served /openapi.json (see .ci/run).
// It makes the calls the Go driver in ../go makes. CI type-checks it in
// strict mode; it has no runtime dependencies besides fetch.
import type { components, operations } from "./schema.gen";

type User = components["schemas"]["User"];
type ErrorResponse = components["schemas"]["ErrorResponse"];
type NewUser = operations["createUser"]["requestBody"]["content"]["application/json"];
type UserChange = NonNullable<operations["updateUser"]["requestBody"]>["content"]["application/json"];
type ListQuery = NonNullable<operations["listUsers"]["parameters"]["query"]>;
type UserID = operations["getUser"]["parameters"]["path"]["user_id"];

// Answer is one of the answers an operation describes: its status, headers,
// and JSON body, if it has one.
type Answer<Op extends keyof operations> = {
  [S in keyof operations[Op]["responses"]]: {
    status: S;
    headers: Headers;
    body: operations[Op]["responses"][S] extends { content: { "application/json": infer B } } ? B : undefined;
  };
}[keyof operations[Op]["responses"]];

async function call<Op extends keyof operations>(
  base: string,
  method: "GET" | "POST" | "PUT" | "DELETE",
  path: string,
  body?: NewUser | UserChange,
): Promise<Answer<Op>> {
  const res = await fetch(base + path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, body: text === "" ? undefined : JSON.parse(text) } as Answer<Op>;
}

const health = (base: string) => call<"health">(base, "GET", "/healthz");
const createUser = (base: string, user: NewUser) => call<"createUser">(base, "POST", "/users/", user);
const getUser = (base: string, id: UserID) => call<"getUser">(base, "GET", `/users/${id}`);
const updateUser = (base: string, id: UserID, change: UserChange) => call<"updateUser">(base, "PUT", `/users/${id}`, change);
const deleteUser = (base: string, id: UserID) => call<"deleteUser">(base, "DELETE", `/users/${id}`);
const listUsers = (base: string, query: ListQuery) =>
  call<"listUsers">(base, "GET", "/users/?" + new URLSearchParams(Object.entries(query).map(([k, v]) => [k, String(v)])));

// nextPage returns the query of a Link header's rel="next" address, or
// undefined if there is no Link.
function nextPage(link: string | null): ListQuery | undefined {
  if (!link) return undefined;
  const m = link.match(/^<([^>]*)>;\s*rel="next"$/);
  if (!m) throw new Error(`the Link header ${link}: not one rel="next" address`);
  const q = new URL(m[1], "http://x").searchParams;
  return { limit: Number(q.get("limit")), after_id: Number(q.get("after_id")) };
}

function fail(what: string, a: { status: number; body: unknown }): never {
  throw new Error(`${what}: ${a.status} ${JSON.stringify(a.body)}`);
}

// drive makes every call, and throws at the first answer that is not the
// one the description promises.
export async function drive(base: string): Promise<void> {
  const h = await health(base);
  if (h.status !== 200 || h.body.status !== "ok") fail("GET /healthz", h);

  const tag = Date.now().toString(36);
  const ids: UserID[] = [];
  for (const i of [0, 1, 2]) {
    const c = await createUser(base, {
      first_name: "Gen",
      last_name: `Client${i}`,
      email: `Gen.${tag}.${i}@Example.com`,
      password: "correct horse battery",
    });
    if (c.status !== 201 || c.headers.get("Location") !== `/users/${c.body.id}`) fail("POST /users/", c);
    ids.push(c.body.id);
  }
  const email = `gen.${tag}.0@example.com`;

  const g = await getUser(base, ids[0]);
  if (g.status !== 200 || g.body.email !== email) fail(`GET /users/${ids[0]}`, g);

  const listed: User[] = [];
  for (let query: ListQuery | undefined = { limit: 2 }; query !== undefined; ) {
    const page = await listUsers(base, query);
    if (page.status !== 200) fail("GET /users/", page);
    listed.push(...page.body);
    query = nextPage(page.headers.get("Link"));
    if (query && query.after_id !== listed[listed.length - 1].id) fail("the Link header's after_id", page);
  }
  for (const id of ids) {
    if (!listed.some((u) => u.id === id)) throw new Error(`GET /users/ following Link: no user ${id}`);
  }

  const u = await updateUser(base, ids[0], { last_name: "Smith" });
  if (u.status !== 200 || u.body.last_name !== "Smith" || u.body.first_name !== "Gen") fail(`PUT /users/${ids[0]}`, u);

  const f = await listUsers(base, { email });
  if (f.status !== 200 || f.body.length !== 1 || f.body[0].id !== ids[0]) fail(`GET /users/?email=${email}`, f);

  for (const id of ids) {
    const d = await deleteUser(base, id);
    if (d.status !== 204) fail(`DELETE /users/${id}`, d);
  }

  const bad = await createUser(base, { first_name: "Gen", last_name: "Client", email, password: "short" });
  if (bad.status !== 400 || bad.body.detail !== "Invalid data" || !bad.body.errors?.password) {
    fail("POST /users/ with a short password", bad);
  }

  const gone = await getUser(base, ids[0]);
  if (gone.status !== 404) fail(`GET /users/${ids[0]} after DELETE`, gone);
  const notFound: ErrorResponse = gone.body;
  if (notFound.detail !== "User not found") fail(`GET /users/${ids[0]} after DELETE`, gone);
}
