//! Ember's API against its contract: `docs/openapi.yaml` (what Ember
//! documents) and Firecracker's own Swagger description
//! (`shared/firecracker-api/firecracker.yaml`, beside the repository).
//!
//! - every endpoint the server routes is documented, and nothing else;
//! - every example in the document is accepted by the parser;
//! - every request body valid under Firecracker's schemas, for every
//!   endpoint Ember serves, is accepted, and one with an extra field is not;
//! - request bodies have Firecracker's schemas, field for field;
//! - what the GET endpoints return fits the documented schemas.

use std::path::{Path, PathBuf};

use ember_api::{
    parse_request, response_to_http, ActionHandler, PreBootResources, VmmAction,
    DEFAULT_MAX_PAYLOAD, FIRECRACKER_API_VERSION, ROUTES,
};
use serde_json::{json, Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s.parse::<f64>().map(|f| json!(f)).unwrap_or(json!(s)),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("unexpected YAML key {other:?}"),
                };
                m.insert(key, to_json(v));
            }
            Value::Object(m)
        }
        Yaml::Null => Value::Null,
        other => panic!("unexpected YAML value {other:?}"),
    }
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}. Firecracker's API description is expected in the shared/ \
             directory beside the repository (shared/firecracker-api/firecracker.yaml).",
            path.display()
        )
    });
    let docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    to_json(docs.first().expect("one YAML document"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ember_doc() -> Value {
    load(&repo().join("docs/openapi.yaml"))
}

fn firecracker_doc() -> Value {
    load(&repo().join("../shared/firecracker-api/firecracker.yaml"))
}

/// Follows a `#/definitions/Name` reference.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r
                .strip_prefix("#/definitions/")
                .unwrap_or_else(|| panic!("unsupported reference {r}"));
            resolve(doc, &doc["definitions"][name])
        }
        None => schema,
    }
}

fn ref_name(schema: &Value) -> Option<&str> {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/definitions/"))
}

fn operation<'a>(doc: &'a Value, path: &str, method: &str) -> Option<&'a Value> {
    doc["paths"].get(path)?.get(method.to_ascii_lowercase())
}

fn body_param(op: &Value) -> Option<&Value> {
    op.get("parameters")?
        .as_array()?
        .iter()
        .find(|p| p["in"] == "body")
}

fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            ops.push((method.to_ascii_uppercase(), path.clone()));
        }
    }
    ops
}

fn parse(method: &str, path: &str, body: &Value) -> Result<VmmAction, ember_api::ApiError> {
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    parse_request(method, path, text.as_bytes(), DEFAULT_MAX_PAYLOAD)
}

/// A small JSON Schema check (Swagger 2.0 subset: type, enum, required,
/// properties, additionalProperties, items, minimum, maximum), where an
/// optional property may be null, as Firecracker answers absent ones.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!("{at}: {value} not in {options:?}"));
        }
    }
    let ty = schema
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("object");
    match ty {
        "string" if value.is_string() => Ok(()),
        "boolean" if value.is_boolean() => Ok(()),
        "integer" => {
            let v = value
                .as_i64()
                .ok_or(format!("{at}: {value} is not an integer"))?;
            if let Some(min) = schema.get("minimum").and_then(Value::as_i64) {
                if v < min {
                    return Err(format!("{at}: {v} < minimum {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_i64) {
                if v > max {
                    return Err(format!("{at}: {v} > maximum {max}"));
                }
            }
            Ok(())
        }
        "array" => {
            let items = value.as_array().ok_or(format!("{at}: not an array"))?;
            for (i, item) in items.iter().enumerate() {
                check(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        "object" => {
            let obj = value
                .as_object()
                .ok_or(format!("{at}: {value} is not an object"))?;
            for r in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let r = r.as_str().unwrap_or_default();
                if !obj.contains_key(r) {
                    return Err(format!("{at}: required `{r}` missing in {value}"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties");
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for (k, v) in obj {
                // Firecracker writes an absent optional field as null.
                if v.is_null() && !required.contains(&k.as_str()) {
                    continue;
                }
                match (props.and_then(|p| p.get(k)), extra) {
                    (Some(p), _) => check(doc, p, v, &format!("{at}.{k}"))?,
                    (None, Some(e)) if e.is_object() => check(doc, e, v, &format!("{at}.{k}"))?,
                    (None, Some(Value::Bool(true))) => {}
                    _ => return Err(format!("{at}: `{k}` is not a documented field")),
                }
            }
            Ok(())
        }
        _ => Err(format!("{at}: {value} is not a {ty}")),
    }
}

/// A value valid under `schema`: only required fields (`full` = false) or
/// every field, enum members chosen by `variant`.
fn sample(doc: &Value, schema: &Value, full: bool, variant: usize) -> Value {
    let schema = resolve(doc, schema);
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        return options[variant % options.len()].clone();
    }
    if let Some(example) = schema.get("example") {
        if !example.is_object() {
            return example.clone();
        }
    }
    match schema
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("object")
    {
        // Also a valid resource id, for the ids that appear in paths.
        "string"
            if schema["format"]
                .as_str()
                .is_some_and(|f| f.starts_with("169.254.")) =>
        {
            json!(format!("169.254.169.{}", 1 + variant))
        }
        "string" => json!(format!("sample_{variant}")),
        "integer" => json!(schema.get("minimum").and_then(Value::as_i64).unwrap_or(1)),
        "boolean" => json!(variant % 2 == 0),
        "array" => json!([sample(doc, &schema["items"], full, variant)]),
        "object" => {
            let mut m = Map::new();
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, p) in props {
                    if full || required.contains(&k.as_str()) {
                        m.insert(k.clone(), sample(doc, p, full, variant));
                    }
                }
            }
            if full {
                if let Some(extra) = schema.get("additionalProperties").filter(|e| e.is_object()) {
                    m.insert("key".into(), sample(doc, extra, full, variant));
                }
            }
            Value::Object(m)
        }
        other => panic!("cannot sample type {other}"),
    }
}

/// The path with its `{param}` filled from the body's field of that name,
/// as Firecracker requires them to match.
fn fill_path(template: &str, body: &Value, op: &Value) -> String {
    let mut path = template.to_string();
    for p in op["parameters"].as_array().into_iter().flatten() {
        if p["in"] != "path" {
            continue;
        }
        let name = p["name"].as_str().unwrap();
        let value = body
            .get(name)
            .and_then(Value::as_str)
            .map(String::from)
            .or_else(|| p.get("x-example").and_then(Value::as_str).map(String::from))
            .unwrap_or_else(|| panic!("no value for path parameter {name} of {template}"));
        path = path.replace(&format!("{{{name}}}"), &value);
    }
    path
}

#[test]
fn every_served_endpoint_is_documented_and_nothing_else() {
    let doc = ember_doc();
    for r in ROUTES {
        assert!(
            operation(&doc, r.path, r.method).is_some(),
            "{} {} is served but missing from docs/openapi.yaml",
            r.method,
            r.path
        );
    }
    for (method, path) in operations(&doc) {
        assert!(
            ROUTES.iter().any(|r| r.method == method && r.path == path),
            "docs/openapi.yaml documents {method} {path}, which the server does not route"
        );
    }
}

#[test]
fn every_documented_endpoint_is_firecrackers() {
    let ember = ember_doc();
    let fc = firecracker_doc();
    for (method, path) in operations(&ember) {
        let theirs = operation(&fc, &path, &method)
            .unwrap_or_else(|| panic!("{method} {path} is not in Firecracker's API"));
        let ours = operation(&ember, &path, &method).unwrap();
        assert_eq!(
            ours["operationId"], theirs["operationId"],
            "{method} {path}"
        );
        // Same body schema...
        let ours_body = body_param(ours).map(|p| ref_name(&p["schema"]));
        let theirs_body = body_param(theirs).map(|p| ref_name(&p["schema"]));
        assert_eq!(ours_body, theirs_body, "body of {method} {path}");
        // ...same success status and response schema.
        for status in ["200", "204"] {
            assert_eq!(
                ours["responses"]
                    .get(status)
                    .map(|r| ref_name(&r["schema"])),
                theirs["responses"]
                    .get(status)
                    .map(|r| ref_name(&r["schema"])),
                "{status} of {method} {path}"
            );
        }
    }
}

/// The request-body definitions Ember documents are Firecracker's, field
/// for field: same fields, same required ones, same enum values, and the
/// same for every definition they refer to.
#[test]
fn request_body_schemas_are_firecrackers() {
    let ember = ember_doc();
    let fc = firecracker_doc();
    let mut todo: Vec<String> = operations(&ember)
        .iter()
        .filter_map(|(m, p)| body_param(operation(&ember, p, m)?).cloned())
        .filter_map(|p| ref_name(&p["schema"]).map(String::from))
        .collect();
    let mut seen = Vec::new();
    while let Some(name) = todo.pop() {
        if seen.contains(&name) {
            continue;
        }
        let ours = &ember["definitions"][&name];
        let theirs = &fc["definitions"][&name];
        assert!(ours.is_object() && theirs.is_object(), "definition {name}");
        assert_eq!(
            ours.get("required"),
            theirs.get("required"),
            "required of {name}"
        );
        assert_eq!(ours.get("enum"), theirs.get("enum"), "enum of {name}");
        assert_eq!(ours.get("type"), theirs.get("type"), "type of {name}");
        let keys = |d: &Value| -> Vec<String> {
            d.get("properties")
                .and_then(Value::as_object)
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(keys(ours), keys(theirs), "fields of {name}");
        for (field, p) in ours
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let q = &theirs["properties"][field];
            for attr in ["type", "enum", "minimum", "maximum", "$ref"] {
                assert_eq!(p.get(attr), q.get(attr), "{name}.{field} {attr}");
            }
            if let Some(r) = ref_name(p) {
                todo.push(r.to_string());
            }
        }
        seen.push(name);
    }
    assert!(seen.len() >= 10, "only {seen:?} checked");
}

#[test]
fn every_example_is_accepted() {
    let doc = ember_doc();
    let mut checked = 0;
    let mut bodiless_patches = 0;
    for (method, path) in operations(&doc) {
        let op = operation(&doc, &path, &method).unwrap();
        let Some(param) = body_param(op) else {
            let action = parse(&method, &path, &Value::Null)
                .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"));
            // Ending a hinting run is the one PATCH without a body.
            assert!(
                action.is_get()
                    || action == ember_api::VmmAction::StopBalloonHinting
                    || method.eq_ignore_ascii_case("GET"),
                "{method} {path} -> {action:?}"
            );
            bodiless_patches += usize::from(method != "get" && method != "GET");
            continue;
        };
        let schema = resolve(&doc, &param["schema"]);
        let example = param
            .get("x-example")
            .or_else(|| schema.get("example"))
            .unwrap_or_else(|| panic!("{method} {path} has no body example"));
        check(
            &doc,
            schema_for_check(&param["schema"], &method),
            example,
            &path,
        )
        .unwrap_or_else(|e| panic!("the example of {method} {path} is not valid: {e}"));
        let url = fill_path(&path, example, op);
        parse(&method, &url, example)
            .unwrap_or_else(|e| panic!("{method} {url} {example}: {} {}", e.status, e.message));
        checked += 1;
    }
    let with_body = ROUTES.iter().filter(|r| r.method != "GET").count();
    assert_eq!(checked + bodiless_patches, with_body);
}

/// PATCH bodies are partial: their schema's required list does not apply.
fn schema_for_check<'a>(schema: &'a Value, method: &str) -> &'a Value {
    static ANY: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    if method == "PATCH" && ref_name(schema) == Some("MachineConfiguration") {
        ANY.get_or_init(|| json!({"type": "object", "additionalProperties": true}))
    } else {
        schema
    }
}

#[test]
fn bodies_valid_for_firecracker_are_accepted() {
    let fc = firecracker_doc();
    let mut checked = 0;
    for r in ROUTES {
        let op = operation(&fc, r.path, r.method)
            .unwrap_or_else(|| panic!("{} {} is not in Firecracker's API", r.method, r.path));
        let Some(param) = body_param(op) else {
            continue;
        };
        if r.path == "/cpu-config" {
            // Its strings are numbers and bitmaps the generator cannot make,
            // and half its fields are aarch64's, which Firecracker on x86_64
            // refuses: the documented example and the parser's tests cover it.
            continue;
        }
        let schema = &param["schema"];
        let enum_width = 7;
        for full in [false, true] {
            for variant in 0..enum_width {
                let mut body = sample(&fc, schema, full, variant);
                check(&fc, schema, &body, r.path)
                    .unwrap_or_else(|e| panic!("generated an invalid body: {e}"));
                if r.path == "/snapshot/load" {
                    // Exactly one of the two memory fields, as the schema's
                    // description (not its `required` list) demands.
                    match body.as_object_mut() {
                        Some(o) if o.contains_key("mem_backend") => {
                            o.remove("mem_file_path");
                        }
                        Some(o) if !o.contains_key("mem_file_path") => {
                            o.insert("mem_file_path".into(), json!("mem"));
                        }
                        _ => {}
                    }
                }
                let path = fill_path(r.path, &body, op);
                if body.get("cpu_template") == Some(&json!("V1N1")) {
                    // aarch64's template: Firecracker on x86_64 refuses it too.
                    let e = parse(r.method, &path, &body).expect_err(&body.to_string());
                    assert!(
                        e.message.contains("unknown variant `V1N1`"),
                        "{}",
                        e.message
                    );
                    continue;
                }
                parse(r.method, &path, &body).unwrap_or_else(|e| {
                    panic!("{} {path} {body}: {} {}", r.method, e.status, e.message)
                });
                checked += 1;

                // Fields Firecracker does not know are refused (the
                // metadata store takes any JSON).
                if ref_name(schema) == Some("MmdsContentsObject") {
                    continue;
                }
                let mut extra = body.clone();
                extra["not_a_firecracker_field"] = json!(1);
                let e = parse(r.method, &path, &extra).expect_err(&extra.to_string());
                assert_eq!(e.status, 400, "{} {path}", r.method);
            }
        }
    }
    assert!(checked >= 10 * 2 * 7, "{checked}");
}

#[test]
fn get_responses_fit_the_documented_schemas() {
    let doc = ember_doc();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"").unwrap();
    let mut vm = PreBootResources::new("vm-1");
    for (method, path, body) in [
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "None"}),
        ),
        (
            "PUT",
            "/logger",
            json!({"level": "Info", "show_level": true}),
        ),
        (
            "PUT",
            "/balloon",
            json!({"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
        ),
    ] {
        let action = parse(method, path, &body).unwrap();
        vm.handle(action)
            .unwrap_or_else(|e| panic!("{path}: {e:?}"));
    }
    for (method, path) in operations(&doc) {
        if method != "GET" {
            continue;
        }
        let op = operation(&doc, &path, &method).unwrap();
        let action = parse(&method, &path, &Value::Null).unwrap();
        // The balloon's statistics and hinting state exist once it runs:
        // their answers are built from the device's types.
        let answer = match action {
            ember_api::VmmAction::GetBalloonStats => {
                Ok(ember_api::VmmData::BalloonStats(ember_api::BalloonStats {
                    target_pages: 4096,
                    target_mib: 16,
                    free_memory: Some(1 << 20),
                    ..Default::default()
                }))
            }
            ember_api::VmmAction::GetBalloonHintingStatus => Ok(ember_api::VmmData::HintingStatus(
                ember_api::HintingStatus {
                    host_cmd: 2,
                    guest_cmd: Some(2),
                },
            )),
            action => vm.handle(action),
        };
        let http = response_to_http(&answer);
        assert_eq!(http.status, 200, "{path}");
        let value: Value = serde_json::from_str(http.body.as_deref().unwrap()).unwrap();
        check(&doc, &op["responses"]["200"]["schema"], &value, &path)
            .unwrap_or_else(|e| panic!("GET {path} answered {value}: {e}"));
    }
}

#[test]
fn version_matches_the_contract() {
    let fc = firecracker_doc();
    let ember = ember_doc();
    let theirs = fc["info"]["version"].as_str().unwrap();
    assert!(
        theirs.starts_with(FIRECRACKER_API_VERSION),
        "Ember claims Firecracker {FIRECRACKER_API_VERSION}, the contract is {theirs}"
    );
    assert_eq!(
        ember["info"]["x-firecracker-api-version"],
        FIRECRACKER_API_VERSION
    );
    assert_eq!(ember["info"]["version"], ember_api::EMBER_VERSION);
}
