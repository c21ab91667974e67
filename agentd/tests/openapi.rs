//! `control-api/openapi.json` held to the server: its routes are the
//! router's table ([`control_api::router::ROUTES`]), a real agentd routes
//! every documented operation, answers only documented statuses, and the
//! responses of a real flow (sessions, exec, runtimes, code interpreter,
//! errors) validate against the documented schemas with the small checker
//! below (`$ref`, `allOf`/`anyOf`/`oneOf`, `nullable`, types, `enum`,
//! required and unknown properties, items, bounds).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Duration;

use base64::Engine;
use common::*;
use control_api::router::ROUTES;
use serde_json::{json, Value};

const DOC: &str = include_str!("../../control-api/openapi.json");

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn doc() -> Value {
    serde_json::from_str(DOC).expect("control-api/openapi.json is not JSON")
}

/// Follows `$ref`s (local pointers only) to the object they name.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..16 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let ptr = r.strip_prefix('#').unwrap_or_else(|| panic!("non-local $ref {r}"));
                v = doc.pointer(ptr).unwrap_or_else(|| panic!("$ref {r} names nothing"));
            }
            None => return v,
        }
    }
    panic!("$ref chain too long at {v}");
}

/// One documented operation.
#[derive(Clone)]
struct Op {
    method: String,
    path: String,
    id: String,
    /// The operation object, with the path item's parameters merged in.
    op: Value,
}

fn operations(doc: &Value) -> Vec<Op> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let shared: Vec<Value> = item["parameters"].as_array().cloned().unwrap_or_default();
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let mut op = op.clone();
            let mut params = shared.clone();
            params.extend(op["parameters"].as_array().cloned().unwrap_or_default());
            op["parameters"] = Value::Array(params);
            out.push(Op {
                method: m.to_uppercase(),
                path: path.clone(),
                id: op["operationId"].as_str().unwrap_or("").to_string(),
                op,
            });
        }
    }
    out
}

// --- the schema checker ---------------------------------------------------

/// Checks `v` against `schema`; every mismatch is pushed to `errs`, named
/// by its JSON path.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let s = resolve(doc, schema);
    if v.is_null() && s["nullable"] == true {
        return;
    }
    if let Some(all) = s["allOf"].as_array() {
        for sub in all {
            check(doc, sub, v, at, errs);
        }
    }
    let passes = |sub: &Value| {
        let mut e = Vec::new();
        check(doc, sub, v, at, &mut e);
        e
    };
    if let Some(any) = s["anyOf"].as_array() {
        let results: Vec<Vec<String>> = any.iter().map(passes).collect();
        if !results.iter().any(Vec::is_empty) {
            errs.push(format!("{at}: matches none of anyOf: {results:?}"));
        }
    }
    if let Some(one) = s["oneOf"].as_array() {
        let results: Vec<Vec<String>> = one.iter().map(passes).collect();
        let n = results.iter().filter(|r| r.is_empty()).count();
        if n != 1 {
            errs.push(format!("{at}: matches {n} of oneOf (exactly one wanted): {results:?}"));
        }
    }
    if let Some(choices) = s["enum"].as_array() {
        if !choices.contains(v) {
            errs.push(format!("{at}: {v} is not one of {choices:?}"));
        }
    }
    // No type: anything (the composition above said what it had to).
    let Some(ty) = s["type"].as_str() else {
        return;
    };
    let type_ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        other => {
            errs.push(format!("{at}: the schema has unknown type {other:?}"));
            return;
        }
    };
    if !type_ok {
        errs.push(format!(
            "{at}: {} is not {ty}{}",
            short(v),
            if v.is_null() {
                " (and the schema is not nullable)"
            } else {
                ""
            }
        ));
        return;
    }
    match ty {
        "object" => {
            let o = v.as_object().unwrap();
            for r in s["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !o.contains_key(r) {
                    errs.push(format!("{at}: required property {r:?} is missing"));
                }
            }
            let props = s["properties"].as_object();
            for (k, val) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => check(doc, ps, val, &format!("{at}.{k}"), errs),
                    None => match &s["additionalProperties"] {
                        Value::Bool(false) => errs.push(format!("{at}: property {k:?} is not in the schema")),
                        extra @ Value::Object(_) => check(doc, extra, val, &format!("{at}.{k}"), errs),
                        _ => {}
                    },
                }
            }
        }
        "array" => {
            let a = v.as_array().unwrap();
            if let Some(min) = s["minItems"].as_u64() {
                if (a.len() as u64) < min {
                    errs.push(format!("{at}: {} items, fewer than minItems {min}", a.len()));
                }
            }
            if let Some(items) = s.get("items") {
                for (i, item) in a.iter().enumerate() {
                    check(doc, items, item, &format!("{at}[{i}]"), errs);
                }
            }
        }
        "string" => {
            let t = v.as_str().unwrap();
            let n = t.chars().count() as u64;
            if s["minLength"].as_u64().is_some_and(|m| n < m) || s["maxLength"].as_u64().is_some_and(|m| n > m) {
                errs.push(format!("{at}: length {n} is outside the schema's bounds"));
            }
            if s["format"] == "byte" && base64::engine::general_purpose::STANDARD.decode(t).is_err() {
                errs.push(format!("{at}: {t:?} is not base64"));
            }
        }
        "integer" | "number" => {
            let x = v.as_f64().unwrap();
            if let Some(min) = s["minimum"].as_f64() {
                let exclusive = s["exclusiveMinimum"] == true;
                if x < min || (exclusive && x == min) {
                    errs.push(format!("{at}: {x} is below the minimum {min}"));
                }
            }
            if let Some(max) = s["maximum"].as_f64() {
                if x > max {
                    errs.push(format!("{at}: {x} is above the maximum {max}"));
                }
            }
        }
        _ => {}
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

fn validate(doc: &Value, schema: &Value, v: &Value, what: &str) {
    let mut errs = Vec::new();
    check(doc, schema, v, "$", &mut errs);
    assert!(
        errs.is_empty(),
        "{what}: {v}\ndoes not match its schema:\n  {}",
        errs.join("\n  ")
    );
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

#[test]
fn the_checker_catches_what_it_should() {
    let d = doc();
    let bad = |name: &str, v: Value| {
        let mut e = Vec::new();
        check(&d, &schema(name), &v, "$", &mut e);
        assert!(!e.is_empty(), "{name} accepted {v}");
    };
    bad("Error", json!({"code": "not_found"}));
    bad("Error", json!({"code": "nope", "message": "x"}));
    bad("PinEndpoint", json!({"version": 1, "extra": true}));
    bad("PinEndpoint", json!({"version": "1"}));
    bad("Metering", json!({"cpu_ns": 1.5, "memory_gib_s": 0, "memory_bytes": 0}));
    bad("ExecBody", json!({"argv": []}));
    bad("ExecBody", json!({"argv": ["x"], "timeout_s": 0}));
    bad("ExecEvent", json!({"type": "exit", "pid": 3}));
    bad(
        "RuntimeInfo",
        json!({"name": "a", "created_at_ms": 1, "latest_version": 1, "endpoints": {"D": "x"}}),
    );
    bad(
        "ToolResult",
        json!({"content": [], "structuredContent": {"nothing": 1}, "isError": false}),
    );
    bad("FileContent", json!({"path": "a", "blob": "not base64!"}));
    let mut e = Vec::new();
    check(
        &d,
        &schema("ExecEvent"),
        &json!({"type": "exit", "exit_code": null, "signal": 9, "timed_out": false, "duration_ms": 1.0}),
        "$",
        &mut e,
    );
    assert!(e.is_empty(), "{e:?}");
}

// --- (a) the document's routes are the router's --------------------------

#[test]
fn the_document_describes_exactly_the_routers_routes() {
    let d = doc();
    assert!(d["openapi"].as_str().unwrap().starts_with("3.0"), "{}", d["openapi"]);
    let documented: BTreeSet<(String, String)> = operations(&d)
        .iter()
        .map(|o| (o.method.clone(), o.path.clone()))
        .collect();
    let routed: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(ROUTES.len(), routed.len(), "ROUTES lists a route twice");
    let missing: Vec<_> = routed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "openapi.json and ROUTES differ: routed but not documented {missing:?}; documented but not routed {extra:?}"
    );
    // Operation ids: unique, and the platform's names are there.
    let ids: Vec<String> = operations(&d).iter().map(|o| o.id.clone()).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate operationId in {ids:?}");
    for want in [
        "CreateSession",
        "ListSessions",
        "GetSession",
        "DeleteSession",
        "ExecCommand",
        "ExecCommandStream",
        "CreateAgentRuntime",
        "ListAgentRuntimes",
        "GetAgentRuntime",
        "DeleteAgentRuntime",
        "CreateAgentRuntimeVersion",
        "ListAgentRuntimeVersions",
        "UpdateAgentRuntimeEndpoint",
        "InvokeAgentRuntime",
        "StartCodeInterpreterSession",
        "GetCodeInterpreterSession",
        "StopCodeInterpreterSession",
        "InvokeCodeInterpreter",
        "InvokeCodeInterpreterStream",
        "GetHealth",
        "GetMetrics",
        "ListPools",
    ] {
        assert!(ids.iter().any(|i| i == want), "no operation {want}");
    }
    // Every path parameter is declared, every response described, every
    // $ref resolves.
    for o in operations(&d) {
        let declared: BTreeSet<String> = o.op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| resolve(&d, p))
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        let in_template: BTreeSet<String> = o
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_string)
            .collect();
        assert_eq!(declared, in_template, "{} {}: path parameters", o.method, o.path);
        let responses = o.op["responses"].as_object().unwrap();
        assert!(!responses.is_empty(), "{}: no responses", o.id);
        for (code, r) in responses {
            assert!(
                resolve(&d, r)["description"].is_string(),
                "{} {code}: no description",
                o.id
            );
        }
    }
    fn refs(doc: &Value, v: &Value) {
        match v {
            Value::Object(o) => {
                if o.contains_key("$ref") {
                    resolve(doc, v);
                }
                o.values().for_each(|x| refs(doc, x));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(doc, x)),
            _ => {}
        }
    }
    refs(&d, &d);
}

// --- a client that keeps status, headers and body --------------------------

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_type(&self) -> String {
        self.header("content-type")
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn lines(&self) -> Vec<Value> {
        self.body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap_or_else(|e| panic!("an ndjson line is not JSON: {e}")))
            .collect()
    }
}

struct Api {
    a: Agentd,
    http: ureq::Agent,
    doc: Value,
    ops: Vec<Op>,
}

impl Api {
    fn start() -> Api {
        Api {
            a: Agentd::start(Backend::Namespace, 0),
            http: ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build(),
            doc: doc(),
            ops: operations(&doc()),
        }
    }

    fn op(&self, id: &str) -> &Op {
        self.ops
            .iter()
            .find(|o| o.id == id)
            .unwrap_or_else(|| panic!("no operation {id}"))
    }

    fn send(&self, method: &str, path: &str, body: Option<&[u8]>, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.http.request(method, &format!("{}{path}", self.a.base));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let res = match body {
            Some(b) => req.set("content-type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let res = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}\n--- agentd log ---\n{}", self.a.log()),
        };
        let status = res.status();
        let headers = res
            .headers_names()
            .into_iter()
            .flat_map(|n| {
                res.all(&n)
                    .into_iter()
                    .map(|v| (n.clone(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut body = Vec::new();
        res.into_reader().read_to_end(&mut body).unwrap();
        Reply { status, headers, body }
    }

    /// Holds a reply to the operation's documentation: a documented status,
    /// its required headers, a documented media type, a body matching the
    /// schema (each line, for ndjson).
    fn check_reply(&self, op: &Op, r: &Reply) {
        let what = format!("{} → {}", op.id, r.status);
        let responses = &op.op["responses"];
        let documented = responses
            .get(r.status.to_string())
            .or_else(|| responses.get("default"))
            .unwrap_or_else(|| {
                panic!(
                    "{what}: status {} is not documented (documented: {:?}); body {}",
                    r.status,
                    responses.as_object().unwrap().keys().collect::<Vec<_>>(),
                    String::from_utf8_lossy(&r.body)
                )
            });
        let documented = resolve(&self.doc, documented);
        for (name, h) in documented["headers"].as_object().into_iter().flatten() {
            let h = resolve(&self.doc, h);
            if h["required"] == true {
                let v = r
                    .header(name)
                    .unwrap_or_else(|| panic!("{what}: no {name} header ({:?})", r.headers));
                validate(
                    &self.doc,
                    &h["schema"],
                    &header_value(&h["schema"], v),
                    &format!("{what} {name}"),
                );
            }
        }
        let ct = r.content_type();
        let content = documented["content"].as_object();
        let media = content.and_then(|c| {
            c.iter()
                .find(|(k, _)| k.split(';').next().unwrap().trim() == ct)
                .or_else(|| c.get_key_value("*/*"))
        });
        let Some((_, media)) = media else {
            panic!(
                "{what}: content type {ct:?} is not documented ({:?})",
                content.map(|c| c.keys().collect::<Vec<_>>())
            );
        };
        match ct.as_str() {
            "application/json" => {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
                    panic!(
                        "{what}: the body is not JSON ({e}): {}",
                        String::from_utf8_lossy(&r.body)
                    )
                });
                validate(&self.doc, &media["schema"], &v, &what);
            }
            "application/x-ndjson" => {
                let lines = r.lines();
                assert!(!lines.is_empty(), "{what}: an empty stream");
                for (i, l) in lines.iter().enumerate() {
                    validate(&self.doc, &media["schema"], l, &format!("{what} line {i}"));
                }
            }
            _ => {}
        }
    }

    /// Calls a documented operation: the request body is checked against
    /// the documented request schema first (`valid` false for a request
    /// meant to be refused), the reply against the documented response.
    fn call_op(&self, id: &str, params: &[(&str, &str)], query: &str, body: Option<Value>, valid: bool) -> Reply {
        let op = self.op(id).clone();
        let mut path = op.path.clone();
        for (k, v) in params {
            path = path.replace(&format!("{{{k}}}"), v);
        }
        assert!(!path.contains('{'), "{id}: unfilled parameter in {path}");
        if let (Some(b), true) = (&body, valid) {
            let s = &op.op["requestBody"]["content"]["application/json"]["schema"];
            assert!(!s.is_null(), "{id}: no documented JSON request body");
            validate(&self.doc, s, b, &format!("{id} request"));
        }
        let bytes = body.map(|b| b.to_string().into_bytes());
        let r = self.send(&op.method, &format!("{path}{query}"), bytes.as_deref(), &[]);
        self.check_reply(&op, &r);
        r
    }

    fn call(&self, id: &str, params: &[(&str, &str)], body: Option<Value>) -> Reply {
        self.call_op(id, params, "", body, true)
    }

    /// A call expected to succeed with `status`.
    fn ok(&self, id: &str, params: &[(&str, &str)], body: Option<Value>, status: u16) -> Value {
        let r = self.call(id, params, body);
        assert_eq!(
            r.status,
            status,
            "{id}: {}\n--- agentd log ---\n{}",
            String::from_utf8_lossy(&r.body),
            self.a.log()
        );
        r.json()
    }

    /// A call expected to fail with `status` (its body checked against Error
    /// by `check_reply`, since the documented response says so).
    fn fails(&self, id: &str, params: &[(&str, &str)], body: Option<Value>, status: u16) -> Value {
        let r = self.call_op(id, params, "", body, false);
        assert_eq!(r.status, status, "{id}: {}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        validate(&self.doc, &schema("Error"), &v, &format!("{id} error"));
        v
    }
}

fn header_value(schema: &Value, v: &str) -> Value {
    match schema["type"].as_str() {
        Some("integer") => v.parse::<i64>().map(Value::from).unwrap_or(Value::from(v)),
        _ => Value::from(v),
    }
}

// --- (b) every documented operation is routed ------------------------------

#[test]
fn every_documented_operation_is_routed_by_a_real_agentd() {
    let api = Api::start();
    let placeholder = |p: &str| -> String {
        p.replace("{id}", "ses-placeholder")
            .replace("{name}", "placeholder")
            .replace("{endpoint}", "placeholder")
    };
    let mut seen = Vec::new();
    for op in &api.ops {
        let path = placeholder(&op.path);
        let json_body = op.op["requestBody"]["content"].get("application/json").is_some();
        let body: Option<&[u8]> = json_body.then_some(b"{}");
        let r = api.send(&op.method, &path, body, &[]);
        let v = r.json();
        let msg = v["message"].as_str().unwrap_or("");
        assert!(
            r.status != 405 && !(r.status == 404 && msg.starts_with("no route")),
            "{} {path} ({}) is documented but not routed: {} {v}",
            op.method,
            op.id,
            r.status
        );
        api.check_reply(op, &r);
        seen.push(format!("{} {} → {}", op.id, path, r.status));
        // A request schema that refuses unknown fields: so does the server.
        if json_body {
            let s = resolve(&api.doc, &op.op["requestBody"]["content"]["application/json"]["schema"]);
            if s["additionalProperties"] == false {
                let r = api.send(&op.method, &path, Some(br#"{"zz_not_a_field": 1}"#), &[]);
                let v = r.json();
                assert_eq!(r.status, 400, "{}: an unknown field was accepted: {v}", op.id);
                assert!(
                    v["message"].as_str().unwrap().contains("unknown field"),
                    "{}: {v}",
                    op.id
                );
                api.check_reply(op, &r);
            }
        }
    }
    eprintln!("{}", seen.join("\n"));
    // The served document is this one.
    let served = api.send("GET", "/openapi.json", None, &[]);
    assert_eq!(served.json(), api.doc);
    // Every documented path answers another method with 405, and an
    // undocumented path is the route miss.
    let paths: BTreeSet<&String> = api.ops.iter().map(|o| &o.path).collect();
    for p in paths {
        let path = placeholder(p);
        let r = api.send("PATCH", &path, None, &[]);
        assert_eq!(r.status, 405, "PATCH {path}: {}", String::from_utf8_lossy(&r.body));
        validate(
            &api.doc,
            &api.doc["components"]["responses"]["MethodNotAllowed"]["content"]["application/json"]["schema"],
            &r.json(),
            "405",
        );
    }
    let r = api.send("GET", "/v1/nothing-here", None, &[]);
    assert_eq!(r.status, 404);
    assert!(r.json()["message"].as_str().unwrap().starts_with("no route"));
    validate(&api.doc, &schema("Error"), &r.json(), "route miss");
}

// --- (c) a real flow, every response validated -----------------------------

#[test]
fn a_real_flow_matches_the_documented_schemas() {
    let api = Api::start();
    // Node.
    api.ok("GetHealth", &[], None, 200);
    api.ok("ListPools", &[], None, 200);
    let m = api.call("GetMetrics", &[], None);
    assert_eq!(m.status, 200);
    assert!(String::from_utf8_lossy(&m.body).contains("warren_sessions"));
    api.ok("GetOpenApiDocument", &[], None, 200);

    // Sessions and exec.
    let s = api.ok("CreateSession", &[], Some(json!({"idle_timeout_s": 600})), 201);
    let id = s["id"].as_str().unwrap().to_string();
    let p = [("id", id.as_str())];
    let r = api.ok(
        "ExecCommand",
        &p,
        Some(json!({"argv": ["sh", "-c", "echo hi; echo oops >&2; exit 3"], "env": {"A": "b"}, "timeout_s": 30})),
        200,
    );
    assert_eq!(
        (r["stdout"].as_str(), r["exit_code"].as_i64()),
        (Some("hi\n"), Some(3)),
        "{r}"
    );
    let st = api.call(
        "ExecCommandStream",
        &p,
        Some(json!({"argv": ["sh", "-c", "echo a; echo b >&2"], "stdin": ""})),
    );
    assert_eq!(st.status, 200);
    let kinds: Vec<String> = st
        .lines()
        .iter()
        .map(|l| l["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("started"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("exit"), "{kinds:?}");
    let got = api.ok("GetSession", &p, None, 200);
    assert_eq!(got["state"], "running");
    let list = api.ok("ListSessions", &[], None, 200);
    assert!(list.as_array().unwrap().iter().any(|x| x["id"] == id.as_str()));
    let ended = api.ok("DeleteSession", &p, None, 200);
    assert_eq!(ended["state"], "ended");
    assert!(ended["scrub"].is_object(), "{ended}");
    let got = api.ok("GetSession", &p, None, 200);
    assert_eq!(got["end_reason"], "deleted");
    // Session errors.
    api.fails("DeleteSession", &p, None, 409);
    api.fails("ExecCommand", &p, Some(json!({"argv": ["true"]})), 409);
    api.fails("ExecCommandStream", &p, Some(json!({"argv": ["true"]})), 409);
    api.fails("GetSession", &[("id", "ses-ghost")], None, 404);
    api.fails("GetSession", &[("id", "bad%20id")], None, 400);
    api.fails("ExecCommand", &[("id", "ses-ghost")], Some(json!({"argv": []})), 400);
    api.fails(
        "ExecCommand",
        &[("id", "ses-ghost")],
        Some(json!({"argv": ["true"]})),
        404,
    );
    api.fails("CreateSession", &[], Some(json!({"memory_mib": 1})), 400);
    api.fails("CreateSession", &[], Some(json!({"image": "nope"})), 404);
    api.fails("CreateSession", &[], Some(json!({"memory_mb": 64})), 400);

    // Runtimes.
    let rt = [("name", "oa")];
    let info = api.ok(
        "CreateAgentRuntime",
        &[],
        Some(json!({"name": "oa", "memory_mib": 96, "env": {"MODE": "one"}, "command": ["sh", "-c", "sleep 1000"]})),
        201,
    );
    assert_eq!(info["endpoints"], json!({"DEFAULT": 1}));
    api.fails("CreateAgentRuntime", &[], Some(json!({"name": "oa"})), 409);
    api.fails("CreateAgentRuntime", &[], Some(json!({"name": "9lives"})), 400);
    api.fails("CreateAgentRuntime", &[], Some(json!({})), 400);
    let v2 = api.ok("CreateAgentRuntimeVersion", &rt, Some(json!({"memory_mib": 112})), 201);
    assert_eq!(v2["version"], 2);
    api.fails("CreateAgentRuntimeVersion", &[("name", "ghost")], Some(json!({})), 404);
    let pinned = api.ok(
        "UpdateAgentRuntimeEndpoint",
        &[("name", "oa"), ("endpoint", "prod")],
        Some(json!({"version": 1})),
        200,
    );
    assert_eq!(pinned["endpoints"], json!({"DEFAULT": 2, "prod": 1}));
    api.fails(
        "UpdateAgentRuntimeEndpoint",
        &[("name", "oa"), ("endpoint", "DEFAULT")],
        Some(json!({"version": 1})),
        409,
    );
    api.fails(
        "UpdateAgentRuntimeEndpoint",
        &[("name", "oa"), ("endpoint", "prod")],
        Some(json!({"version": 9})),
        404,
    );
    let versions = api.ok("ListAgentRuntimeVersions", &rt, None, 200);
    assert_eq!(versions.as_array().unwrap().len(), 2);
    api.ok("GetAgentRuntime", &rt, None, 200);
    api.fails("GetAgentRuntime", &[("name", "ghost")], None, 404);
    let all = api.ok("ListAgentRuntimes", &[], None, 200);
    assert_eq!(all.as_array().unwrap().len(), 1);
    let rs = api.ok(
        "CreateSession",
        &[],
        Some(json!({"runtime": "oa", "endpoint": "prod"})),
        201,
    );
    assert_eq!(
        (rs["runtime"].as_str(), rs["runtime_version"].as_u64()),
        (Some("oa"), Some(1))
    );
    api.fails("CreateSession", &[], Some(json!({"runtime": "oa", "vcpus": 1})), 400);
    api.fails("DeleteAgentRuntime", &rt, None, 409);
    let r = api.call_op("DeleteAgentRuntime", &rt, "?force=true", None, true);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let after = api.ok("GetSession", &[("id", rs["id"].as_str().unwrap())], None, 200);
    assert_eq!(after["end_reason"], "runtime_deleted");
    api.fails("DeleteAgentRuntime", &rt, None, 404);
    // Invocations: only agentd's own answers (the agent server is not in
    // this image yet): a bad session id, an unknown runtime, a body over
    // the limit.
    let inv = api.op("InvokeAgentRuntime").clone();
    let r = api.send(
        "POST",
        "/v1/runtimes/oa/invocations",
        Some(b"{}"),
        &[("x-session-id", "short")],
    );
    assert_eq!(r.status, 400);
    api.check_reply(&inv, &r);
    let r = api.send(
        "POST",
        "/v1/runtimes/oa/invocations?endpoint=DEFAULT",
        Some(b"{}"),
        &[("x-session-id", &"s".repeat(40))],
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    api.check_reply(&inv, &r);
    let big = raw_post_head(&api.a.base, "/v1/runtimes/oa/invocations", 200_000_000);
    assert_eq!(big.status, 413, "{}", String::from_utf8_lossy(&big.body));
    api.check_reply(&inv, &big);

    // Code interpreter.
    let ci = api.ok("StartCodeInterpreterSession", &[], Some(json!({"timeout_s": 600})), 201);
    let cid = ci["session_id"].as_str().unwrap().to_string();
    let c = [("id", cid.as_str())];
    let tool = |name: &str, args: Value, structured: &str| -> Value {
        let r = api.ok(
            "InvokeCodeInterpreter",
            &c,
            Some(json!({"name": name, "arguments": args})),
            200,
        );
        validate(
            &api.doc,
            &schema(structured),
            &r["structuredContent"],
            &format!("{name} structuredContent"),
        );
        r
    };
    let r = tool(
        "executeCommand",
        json!({"command": "echo hi", "timeout_s": 30}),
        "CommandResult",
    );
    assert_eq!(r["structuredContent"]["stdout"], "hi\n");
    let r = tool(
        "executeCode",
        json!({"language": "sh", "code": "echo $((6*7))"}),
        "CommandResult",
    );
    assert_eq!(r["structuredContent"]["stdout"], "42\n");
    tool(
        "writeFiles",
        json!({"content": [{"path": "d/a.txt", "text": "alpha\n"}, {"path": "d/b.bin", "blob": "AAEC"}]}),
        "WriteFilesResult",
    );
    let r = tool("readFiles", json!({"paths": ["d/a.txt", "d/b.bin"]}), "ReadFilesResult");
    assert_eq!(r["content"][1]["resource"]["blob"], "AAEC", "{r}");
    let r = tool("listFiles", json!({"directoryPath": "d"}), "ListFilesResult");
    assert_eq!(r["structuredContent"]["entries"].as_array().unwrap().len(), 2, "{r}");
    tool("removeFiles", json!({"paths": ["d"]}), "RemoveFilesResult");
    let r = tool("readFiles", json!({"paths": ["d/a.txt"]}), "ToolErrorResult");
    assert_eq!(r["isError"], true);
    let t = tool("startCommandExecution", json!({"command": "sleep 30"}), "TaskResult");
    let task = t["structuredContent"]["taskId"].as_str().unwrap().to_string();
    tool("getTask", json!({"taskId": task}), "TaskResult");
    let t = tool("stopTask", json!({"taskId": task}), "TaskResult");
    assert_eq!(t["structuredContent"]["status"], "stopped");
    let st = api.call(
        "InvokeCodeInterpreterStream",
        &c,
        Some(json!({"name": "executeCommand", "arguments": {"command": "echo a; echo b >&2"}})),
    );
    assert_eq!(st.status, 200);
    assert_eq!(st.lines().last().unwrap()["type"], "result");
    api.fails(
        "InvokeCodeInterpreter",
        &c,
        Some(json!({"name": "noSuchTool", "arguments": {}})),
        400,
    );
    api.fails(
        "InvokeCodeInterpreter",
        &c,
        Some(json!({"name": "getTask", "arguments": {"taskId": "task-none"}})),
        404,
    );
    api.fails(
        "InvokeCodeInterpreterStream",
        &c,
        Some(json!({"name": "listFiles", "arguments": {}})),
        400,
    );
    let got = api.ok("GetCodeInterpreterSession", &c, None, 200);
    assert_eq!(got["state"], "running");
    let ended = api.ok("StopCodeInterpreterSession", &c, None, 200);
    assert_eq!(ended["end_reason"], "deleted");
    api.fails("StopCodeInterpreterSession", &c, None, 409);
    api.fails(
        "InvokeCodeInterpreter",
        &c,
        Some(json!({"name": "executeCommand", "arguments": {"command": "true"}})),
        409,
    );
    api.fails("GetCodeInterpreterSession", &[("id", "ses-ghost")], None, 404);
}

/// A POST that declares `len` bytes and sends none: for the 413 that is
/// answered from the head alone.
fn raw_post_head(base: &str, path: &str, len: u64) -> Reply {
    let addr = base.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: agentd\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        if let Some(end) = find(&raw, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_string();
            let cl = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if cl.is_some_and(|cl| raw.len() >= end + 4 + cl) {
                break;
            }
        }
    }
    let end = find(&raw, b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
