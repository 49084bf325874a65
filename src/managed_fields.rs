//! What one field manager applied to an object, read back from the object's `managedFields`
//! (client-go's `Extract*` functions, for any type). The operator uses it after a restart to
//! recover the children it last applied, so a change refused part-way can still be put back.

use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The fields `manager` last applied to `object` (its `Apply` entry), with the object's kind and
/// name, as an object of the same type; None if that manager never applied it or the fields do
/// not make a valid object.
pub fn applied_by<K>(object: &K, manager: &str) -> Option<K>
where
    K: Resource + Serialize + DeserializeOwned,
{
    let meta = object.meta();
    let mut entries = meta.managed_fields.iter().flatten().filter(|e| {
        e.manager.as_deref() == Some(manager) && e.operation.as_deref() == Some("Apply") && e.subresource.as_deref().unwrap_or_default().is_empty()
    });
    let fields = &entries.next()?.fields_v1.as_ref()?.0;
    if entries.next().is_some() {
        // One Apply entry per manager and API version: two mean two versions, not one record.
        return None;
    }
    let live = serde_json::to_value(object).ok()?;
    let mut applied = extract(&live, fields);
    let top = applied.as_object_mut()?;
    // Identity is never in managedFields; an apply needs it.
    for key in ["apiVersion", "kind"] {
        top.insert(key.into(), live.get(key)?.clone());
    }
    let metadata = top.entry("metadata").or_insert_with(|| Value::Object(Map::new())).as_object_mut()?;
    metadata.insert("name".into(), meta.name.clone()?.into());
    if let Some(ns) = &meta.namespace {
        metadata.insert("namespace".into(), ns.clone().into());
    }
    serde_json::from_value(applied).ok()
}

/// Keeps of `value` what `fields` (a `fieldsV1` set) names. A member with no children (`{}`,
/// an atomic value or a whole list item) is kept whole; `f:name` is a field, `k:{...}` the list
/// item with those key fields, `v:...` the list item with that value, `i:N` the N-th item; `.`
/// marks the node itself, so a map or list owned with none of its entries is kept empty.
pub fn extract(value: &Value, fields: &Value) -> Value {
    let Some(set) = fields.as_object().filter(|s| !s.is_empty()) else {
        return value.clone();
    };
    match value {
        Value::Object(object) => {
            let mut kept = Map::new();
            for (key, children) in set {
                if let Some(name) = key.strip_prefix("f:")
                    && let Some(v) = object.get(name)
                {
                    kept.insert(name.to_string(), extract(v, children));
                }
            }
            Value::Object(kept)
        }
        Value::Array(items) => {
            let mut kept = Vec::new();
            // In the list's order, not the set's: a re-apply must not reorder it.
            for (i, item) in items.iter().enumerate() {
                if let Some(children) = set.iter().find(|(key, _)| names_item(key, i, item)).map(|(_, c)| c) {
                    kept.push(extract(item, children));
                }
            }
            Value::Array(kept)
        }
        // A scalar with children in the set: the set is of another shape; keep what is there.
        other => other.clone(),
    }
}

/// Whether the set member `key` names list item `i`, which is `item`.
fn names_item(key: &str, i: usize, item: &Value) -> bool {
    if let Some(keys) = key.strip_prefix("k:") {
        let Ok(Value::Object(keys)) = serde_json::from_str::<Value>(keys) else { return false };
        keys.iter().all(|(field, wanted)| item.get(field) == Some(wanted))
    } else if let Some(wanted) = key.strip_prefix("v:") {
        serde_json::from_str::<Value>(wanted).is_ok_and(|wanted| &wanted == item)
    } else if let Some(index) = key.strip_prefix("i:") {
        index.parse() == Ok(i)
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;
    use serde_json::json;

    /// A Deployment as the API server returns it after one apply by "op" and an edit by
    /// kubectl, with server defaults filled in, in the shape the API server returns.
    fn live() -> Deployment {
        let operator = json!({
            "f:metadata": {
                "f:annotations": {"f:console.spice-operator.io/applied-set": {}},
                "f:labels": {"f:app": {}},
                "f:ownerReferences": {"k:{\"uid\":\"p1\"}": {}},
                "f:finalizers": {"v:\"keep\"": {}}
            },
            "f:spec": {
                "f:replicas": {},
                "f:selector": {},
                "f:template": {
                    "f:metadata": {"f:labels": {"f:app": {}}},
                    "f:spec": {"f:containers": {"k:{\"name\":\"proxy\"}": {
                        ".": {}, "f:name": {}, "f:image": {}, "f:args": {},
                        "f:ports": {"k:{\"containerPort\":3128,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}, "f:name": {}}}
                    }}}
                }
            }
        });
        serde_json::from_value(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "edge", "namespace": "ns", "uid": "u1", "resourceVersion": "42", "generation": 3,
                "labels": {"app": "edge", "team": "added-by-kubectl"},
                "annotations": {"console.spice-operator.io/applied-set": "ab12", "deployment.kubernetes.io/revision": "2"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "SpiceProxy", "name": "edge", "uid": "p1", "controller": true}],
                "finalizers": ["keep", "other"],
                "managedFields": [
                    {"manager": "op", "operation": "Apply", "apiVersion": "apps/v1", "fieldsType": "FieldsV1", "fieldsV1": operator},
                    {"manager": "kubectl-edit", "operation": "Update", "apiVersion": "apps/v1", "fieldsType": "FieldsV1", "fieldsV1": {
                        "f:metadata": {"f:labels": {"f:team": {}}}
                    }},
                    {"manager": "op", "operation": "Update", "subresource": "status", "apiVersion": "apps/v1", "fieldsType": "FieldsV1", "fieldsV1": {
                        "f:status": {"f:replicas": {}}
                    }}
                ]
            },
            "spec": {
                "replicas": 2,
                "revisionHistoryLimit": 10,
                "selector": {"matchLabels": {"app": "edge"}},
                "template": {
                    "metadata": {"labels": {"app": "edge"}},
                    "spec": {
                        "restartPolicy": "Always",
                        "containers": [
                            {"name": "sidecar", "image": "injected"},
                            {"name": "proxy", "image": "spice:1", "args": ["proxy", "--config", "/c"], "imagePullPolicy": "IfNotPresent",
                             "ports": [{"containerPort": 9090, "protocol": "TCP"}, {"containerPort": 3128, "name": "connect", "protocol": "TCP"}]}
                        ]
                    }
                }
            },
            "status": {"replicas": 2}
        }))
        .unwrap()
    }

    #[test]
    fn keeps_what_the_manager_applied_and_nothing_the_server_or_others_added() {
        let applied = applied_by(&live(), "op").expect("op applied this object");
        let expected = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "edge", "namespace": "ns",
                "labels": {"app": "edge"},
                "annotations": {"console.spice-operator.io/applied-set": "ab12"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "SpiceProxy", "name": "edge", "uid": "p1", "controller": true}],
                "finalizers": ["keep"]
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "edge"}},
                "template": {
                    "metadata": {"labels": {"app": "edge"}},
                    "spec": {"containers": [
                        {"name": "proxy", "image": "spice:1", "args": ["proxy", "--config", "/c"], "ports": [{"containerPort": 3128, "name": "connect"}]}
                    ]}
                }
            }
        });
        assert_eq!(serde_json::to_value(&applied).unwrap(), expected);
    }

    #[test]
    fn nothing_is_recalled_for_a_manager_that_never_applied() {
        assert!(applied_by(&live(), "kubectl-edit").is_none(), "an Update is not an applied configuration");
        assert!(applied_by(&live(), "nobody").is_none());
        let mut two_versions = live();
        let entries = two_versions.metadata.managed_fields.as_mut().unwrap();
        let mut other = entries[0].clone();
        other.api_version = Some("apps/v1beta2".into());
        entries.push(other);
        assert!(applied_by(&two_versions, "op").is_none(), "two Apply entries are not one record");
    }

    #[test]
    fn list_items_are_found_by_key_value_and_index() {
        let list = json!([{"name": "a", "x": 1}, {"name": "b", "x": 2}, "plain", 7]);
        let set = json!({"k:{\"name\":\"b\"}": {"f:x": {}}, "v:\"plain\"": {}, "i:3": {}, "k:{\"name\":\"missing\"}": {}});
        assert_eq!(extract(&list, &set), json!([{"x": 2}, "plain", 7]));
        assert!(!names_item("k:not json", 0, &json!({})), "a malformed key names nothing");
        assert!(!names_item("x:1", 0, &json!(1)), "an unknown prefix names nothing");
    }

    #[test]
    fn a_member_without_children_is_kept_whole() {
        let value = json!({"a": {"deep": [1, 2]}, "b": 1});
        assert_eq!(extract(&value, &json!({"f:a": {}})), json!({"a": {"deep": [1, 2]}}));
        assert_eq!(extract(&value, &json!({"f:a": {".": {}}})), json!({"a": {}}), "'.' alone owns the map, none of its entries");
        assert_eq!(extract(&json!({"l": [1]}), &json!({"f:l": {".": {}}})), json!({"l": []}));
        assert_eq!(extract(&json!(5), &json!({"f:x": {}})), json!(5), "a set of another shape keeps the scalar");
    }
}
