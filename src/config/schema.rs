//! `portcullis schema`: the JSON Schema (Draft-07) of the configuration file,
//! generated from the serde mirror in `file.rs`, so editors (taplo, Even Better
//! TOML) complete and check keys exactly as `check` reads them.

use serde_json::Value;

/// The schema as the binary prints it and `portcullis.schema.json` holds it.
pub fn schema() -> Value {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    let mut value = generator.into_root_schema_for::<super::file::File>().to_value();
    strip_null(&mut value);
    value
}

/// TOML has no null: an optional key is simply left out.
fn strip_null(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if let Some(Value::Array(types)) = o.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    o.insert("type".into(), only);
                }
            }
            for key in ["anyOf", "oneOf"] {
                if let Some(Value::Array(alts)) = o.get_mut(key) {
                    alts.retain(|a| a.get("type").and_then(Value::as_str) != Some("null"));
                    if alts.len() == 1 {
                        let only = alts.remove(0);
                        o.remove(key);
                        if let Value::Object(inner) = only {
                            for (k, v) in inner {
                                o.entry(k).or_insert(v);
                            }
                        }
                    }
                }
            }
            if o.get("enum").is_some_and(Value::is_array) {
                if let Some(Value::Array(e)) = o.get_mut("enum") {
                    e.retain(|x| !x.is_null());
                }
            }
            o.values_mut().for_each(strip_null);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_null),
        _ => {}
    }
}
