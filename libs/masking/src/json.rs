//! Masking JSON documents and Kubernetes objects in place.

use std::borrow::Cow;

use base64::Engine as _;
use serde_json::Value;

use crate::{MaskReport, Masker, into_string};

/// The annotation in which `kubectl apply` keeps a full copy of the object, Secret data
/// included: it must be masked like the object itself.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Which rules apply while walking.
#[derive(Debug, Clone, Copy)]
enum Ctx<'k> {
    /// JSON path rules.
    Json,
    /// Kubernetes field rules for objects of this kind ("" if unknown).
    Kube(&'k str),
}

impl Masker {
    /// Masks a JSON document in place: every value selected by a JSON path rule is masked
    /// whole (each string and number beneath it); every other string, and every number, goes
    /// through the detectors. Object keys are left alone. A masked number becomes a string.
    pub fn mask_json(&self, value: &mut Value, report: &mut MaskReport) {
        let mut path = Vec::new();
        self.walk(value, &mut path, Ctx::Json, report);
    }

    /// Masks a Kubernetes API response in place: a single object, a `…List`, a `Table`
    /// (`rows[].object`), or a watch event (`{"type", "object"}`). Kubernetes field rules
    /// apply by the object's `kind`; every other string goes through the detectors. Values
    /// under `Secret.data` and `ConfigMap.binaryData` are base64: they are decoded, masked
    /// and re-encoded, so clients that decode them keep working. The
    /// `kubectl.kubernetes.io/last-applied-configuration` annotation, which holds a copy of
    /// the object, is parsed and masked the same way.
    pub fn mask_kubernetes(&self, value: &mut Value, report: &mut MaskReport) {
        self.kube_dispatch(value, report);
    }

    fn kube_dispatch(&self, value: &mut Value, report: &mut MaskReport) {
        let Some(obj) = value.as_object_mut() else {
            self.walk(value, &mut Vec::new(), Ctx::Kube(""), report);
            return;
        };
        let kind = obj.get("kind").and_then(Value::as_str).map(str::to_owned);
        match kind {
            Some(kind) if kind.len() > 4 && kind.ends_with("List") => {
                let item_kind = &kind[..kind.len() - 4];
                for (key, v) in obj.iter_mut() {
                    if key == "items"
                        && let Value::Array(items) = v
                    {
                        for item in items {
                            if item.get("kind").is_some() {
                                self.kube_dispatch(item, report);
                            } else {
                                self.walk(item, &mut Vec::new(), Ctx::Kube(item_kind), report);
                            }
                        }
                        continue;
                    }
                    self.walk(v, &mut vec![key.clone()], Ctx::Kube(&kind), report);
                }
            }
            Some(kind) if kind == "Table" => {
                for (key, v) in obj.iter_mut() {
                    if key == "rows"
                        && let Value::Array(rows) = v
                    {
                        for row in rows {
                            match row.as_object_mut() {
                                Some(r) => {
                                    for (rk, rv) in r.iter_mut() {
                                        if rk == "object" {
                                            self.kube_dispatch(rv, report);
                                        } else {
                                            let mut p = vec![rk.clone()];
                                            self.walk(rv, &mut p, Ctx::Kube(""), report);
                                        }
                                    }
                                }
                                None => self.walk(row, &mut Vec::new(), Ctx::Kube(""), report),
                            }
                        }
                        continue;
                    }
                    self.walk(v, &mut vec![key.clone()], Ctx::Kube("Table"), report);
                }
            }
            Some(kind) => self.walk(value, &mut Vec::new(), Ctx::Kube(&kind), report),
            None if obj.contains_key("type") && obj.contains_key("object") => {
                for (key, v) in obj.iter_mut() {
                    if key == "object" {
                        self.kube_dispatch(v, report);
                    } else {
                        self.walk(v, &mut vec![key.clone()], Ctx::Kube(""), report);
                    }
                }
            }
            None => self.walk(value, &mut Vec::new(), Ctx::Kube(""), report),
        }
    }

    fn rule_at(&self, ctx: Ctx, path: &[String]) -> Option<usize> {
        match ctx {
            Ctx::Json => self
                .inner
                .json
                .iter()
                .find(|(sel, _)| sel.matches(path))
                .map(|(_, r)| *r),
            Ctx::Kube(kind) => self
                .inner
                .kube
                .iter()
                .find(|(sel, _)| sel.kind_matches(kind) && sel.path.matches(path))
                .map(|(_, r)| *r),
        }
    }

    fn walk(&self, value: &mut Value, path: &mut Vec<String>, ctx: Ctx, report: &mut MaskReport) {
        if let Some(r) = self.rule_at(ctx, path) {
            let b64 = match ctx {
                Ctx::Kube(kind) => is_base64_field(kind, path),
                Ctx::Json => false,
            };
            self.mask_subtree(value, r, b64, report);
            return;
        }
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    path.push(k.clone());
                    self.walk(v, path, ctx, report);
                    path.pop();
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.walk(v, path, ctx, report);
                }
            }
            Value::String(s) => {
                if let Ctx::Kube(_) = ctx
                    && path.len() == 3
                    && path[0] == "metadata"
                    && path[1] == "annotations"
                    && path[2] == LAST_APPLIED
                    && let Ok(mut copy) = serde_json::from_str::<Value>(s)
                {
                    self.kube_dispatch(&mut copy, report);
                    if let Ok(text) = serde_json::to_string(&copy) {
                        *s = text;
                        return;
                    }
                }
                if let Cow::Owned(o) = self.mask_bytes(s.as_bytes(), report) {
                    *s = into_string(o);
                }
            }
            Value::Number(n) => {
                let text = n.to_string();
                if let Cow::Owned(o) = self.mask_bytes(text.as_bytes(), report) {
                    *value = Value::String(into_string(o));
                }
            }
            Value::Bool(_) | Value::Null => {}
        }
    }

    /// Masks every string and number under `value` with rule `r`.
    fn mask_subtree(&self, value: &mut Value, r: usize, b64: bool, report: &mut MaskReport) {
        match value {
            Value::String(s) => {
                let mut out = Vec::new();
                let engine = &base64::engine::general_purpose::STANDARD;
                match b64.then(|| engine.decode(s.as_bytes()).ok()).flatten() {
                    Some(raw) => {
                        self.apply_rule(r, &raw, &mut out, report);
                        *s = engine.encode(&out);
                    }
                    None => {
                        self.apply_rule(r, s.as_bytes(), &mut out, report);
                        *s = into_string(out);
                    }
                }
            }
            Value::Number(n) => {
                let mut out = Vec::new();
                self.apply_rule(r, n.to_string().as_bytes(), &mut out, report);
                *value = Value::String(into_string(out));
            }
            Value::Object(map) => {
                for v in map.values_mut() {
                    self.mask_subtree(v, r, b64, report);
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.mask_subtree(v, r, b64, report);
                }
            }
            Value::Bool(_) | Value::Null => {}
        }
    }
}

/// Fields whose values Kubernetes carries base64-encoded.
fn is_base64_field(kind: &str, path: &[String]) -> bool {
    match path.first().map(String::as_str) {
        Some("data") => kind.eq_ignore_ascii_case("Secret"),
        Some("binaryData") => kind.eq_ignore_ascii_case("ConfigMap"),
        _ => false,
    }
}
