// SPDX-License-Identifier: Apache-2.0

//! The data store: one JSON document, bounded in size, with Firecracker's
//! PUT/PATCH semantics and its two output formats.

use std::fmt;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::token::{TokenAuthority, TokenError};

/// Default bound on the serialized store, in bytes: Firecracker's
/// `http_api_max_payload_size` default.
pub const DEFAULT_DATA_STORE_LIMIT: usize = 51200;

/// The MMDS protocol version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum MmdsVersion {
    /// Tokens are optional.
    #[default]
    V1,
    /// Every GET needs a session token.
    V2,
}

impl fmt::Display for MmdsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmdsVersion::V1 => f.write_str("V1"),
            MmdsVersion::V2 => f.write_str("V2"),
        }
    }
}

/// How a GET's answer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// The JSON value.
    Json,
    /// EC2 IMDS text: an object's keys one per line (objects with a
    /// trailing `/`), a string as itself.
    Imds,
}

/// Data store errors, worded as Firecracker's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmdsError {
    /// The store would exceed its size limit.
    #[error("The MMDS patch request doesn't fit.")]
    DataStoreLimitExceeded,
    /// No value at the path.
    #[error("The MMDS resource does not exist.")]
    NotFound,
    /// PATCH before any PUT.
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    /// A token could not be issued.
    #[error("Token Authority error: {0}")]
    TokenAuthority(#[from] TokenError),
    /// An IMDS-format GET of a value that is neither an object nor a string.
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
}

/// The metadata store shared by the API and every interface's stack.
#[derive(Debug)]
pub struct Mmds {
    version: MmdsVersion,
    data_store: Value,
    tokens: TokenAuthority,
    is_initialized: bool,
    data_store_limit: usize,
    imds_compat: bool,
}

impl Default for Mmds {
    fn default() -> Self {
        Mmds::new(DEFAULT_DATA_STORE_LIMIT)
    }
}

/// Patches `target` in place with `patch`, as JSON Merge Patch (RFC 7396):
/// an object patch merges key by key, `null` deletes, anything else
/// replaces.
pub fn json_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, value) in patch {
            if value.is_null() {
                doc.remove(key);
            } else {
                json_patch(doc.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

fn serialized_len(value: &Value) -> usize {
    // Serializing a `Value` cannot fail: its keys are strings.
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

impl Mmds {
    /// An empty, uninitialized store of at most `data_store_limit` bytes.
    pub fn new(data_store_limit: usize) -> Self {
        Mmds {
            version: MmdsVersion::default(),
            data_store: Value::Null,
            tokens: TokenAuthority::default(),
            is_initialized: false,
            data_store_limit,
            imds_compat: false,
        }
    }

    /// Sets the protocol version.
    pub fn set_version(&mut self, version: MmdsVersion) {
        self.version = version;
    }

    /// The protocol version.
    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    /// Makes GETs answer in IMDS text whatever their `Accept` header says.
    pub fn set_imds_compat(&mut self, imds_compat: bool) {
        self.imds_compat = imds_compat;
    }

    /// Whether GETs always answer in IMDS text.
    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// Sets the size limit for later PUTs and PATCHes.
    pub fn set_data_store_limit(&mut self, limit: usize) {
        self.data_store_limit = limit;
    }

    /// The size limit, in bytes of serialized JSON.
    pub fn data_store_limit(&self) -> usize {
        self.data_store_limit
    }

    /// Whether a PUT has filled the store.
    pub fn is_initialized(&self) -> bool {
        self.is_initialized
    }

    /// Replaces the whole store.
    pub fn put_data(&mut self, data: Value) -> Result<(), MmdsError> {
        if serialized_len(&data) > self.data_store_limit {
            return Err(MmdsError::DataStoreLimitExceeded);
        }
        self.data_store = data;
        self.is_initialized = true;
        Ok(())
    }

    /// Merges `patch` into the store (RFC 7396); the store is unchanged if
    /// the result would not fit.
    pub fn patch_data(&mut self, patch: &Value) -> Result<(), MmdsError> {
        if !self.is_initialized {
            return Err(MmdsError::NotInitialized);
        }
        let mut patched = self.data_store.clone();
        json_patch(&mut patched, patch);
        if serialized_len(&patched) > self.data_store_limit {
            return Err(MmdsError::DataStoreLimitExceeded);
        }
        self.data_store = patched;
        Ok(())
    }

    /// The whole store (`null` before the first PUT).
    pub fn data_store_value(&self) -> &Value {
        &self.data_store
    }

    /// Issues a V2 session token valid for `ttl_seconds`.
    pub fn generate_token(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, MmdsError> {
        Ok(self.tokens.generate(ttl_seconds, now)?)
    }

    /// Whether `token` is a live token issued by this store.
    pub fn is_valid_token(&self, token: &str, now: Instant) -> bool {
        self.tokens.is_valid(token, now)
    }

    fn format_imds(value: &Value) -> Result<String, MmdsError> {
        match value {
            Value::Object(map) => Ok(map
                .iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")),
            Value::String(s) => Ok(s.clone()),
            _ => Err(MmdsError::UnsupportedValueType),
        }
    }

    /// The value at `path` (a JSON pointer; one trailing `/` is ignored),
    /// written in `format` (always IMDS text with `imds_compat`).
    pub fn get_value(&self, path: &str, format: OutputFormat) -> Result<String, MmdsError> {
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = self
            .data_store
            .pointer(pointer)
            .ok_or(MmdsError::NotFound)?;
        if self.imds_compat || format == OutputFormat::Imds {
            Mmds::format_imds(value)
        } else {
            Ok(value.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn store() -> Mmds {
        let mut m = Mmds::default();
        m.put_data(json!({
            "name": {"first": "John", "second": "Doe"},
            "age": 43,
            "phones": {"home": {"RO": "+401234567"}, "mobile": "+442345678"}
        }))
        .unwrap();
        m
    }

    #[test]
    fn json_and_imds_answers() {
        let m = store();
        assert_eq!(
            m.get_value("/name", OutputFormat::Json).unwrap(),
            r#"{"first":"John","second":"Doe"}"#
        );
        assert_eq!(m.get_value("/age", OutputFormat::Json).unwrap(), "43");
        assert_eq!(
            m.get_value("", OutputFormat::Imds).unwrap(),
            "age\nname/\nphones/"
        );
        assert_eq!(
            m.get_value("/", OutputFormat::Imds).unwrap(),
            "age\nname/\nphones/"
        );
        assert_eq!(
            m.get_value("/phones/", OutputFormat::Imds).unwrap(),
            "home/\nmobile"
        );
        assert_eq!(
            m.get_value("/name/first", OutputFormat::Imds).unwrap(),
            "John"
        );
        assert_eq!(
            m.get_value("/age", OutputFormat::Imds),
            Err(MmdsError::UnsupportedValueType)
        );
        assert_eq!(
            m.get_value("/nope", OutputFormat::Json),
            Err(MmdsError::NotFound)
        );
    }

    #[test]
    fn imds_compat_ignores_the_format() {
        let mut m = store();
        m.set_imds_compat(true);
        assert_eq!(
            m.get_value("/name", OutputFormat::Json).unwrap(),
            "first\nsecond"
        );
    }

    #[test]
    fn patch_is_rfc7396_merge_patch() {
        // RFC 7396 Appendix A examples.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut t = target.clone();
            json_patch(&mut t, &patch);
            assert_eq!(t, want, "{target} + {patch}");
        }
    }

    #[test]
    fn patch_needs_a_put_first_and_limits_hold() {
        let mut m = Mmds::new(20);
        assert_eq!(
            m.patch_data(&json!({"a": 1})),
            Err(MmdsError::NotInitialized)
        );
        assert_eq!(
            m.put_data(json!({"a": "0123456789012345678"})),
            Err(MmdsError::DataStoreLimitExceeded)
        );
        assert!(!m.is_initialized());
        m.put_data(json!({"a": "b"})).unwrap();
        assert_eq!(
            m.patch_data(&json!({"b": "0123456789012345678"})),
            Err(MmdsError::DataStoreLimitExceeded)
        );
        assert_eq!(m.data_store_value(), &json!({"a": "b"}));
        m.patch_data(&json!({"c": 1})).unwrap();
        assert_eq!(m.data_store_value(), &json!({"a": "b", "c": 1}));
        assert_eq!(
            MmdsError::DataStoreLimitExceeded.to_string(),
            "The MMDS patch request doesn't fit."
        );
    }
}
