//! JSON objects kept as their text: checked once, their members located, values read
//! straight from the text. Plugin outputs travel this way from the plugin to their Delta
//! table, with no map of values built and dropped per document.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// Why a text is not a JSON object.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// It is not JSON.
    #[error("is not valid JSON: {0}")]
    Invalid(serde_json::Error),
    /// It is JSON, of another kind.
    #[error("is not a JSON object")]
    NotObject,
}

/// A byte range of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// Where `part`, a slice of `text`, lies in it.
    fn of(text: &str, part: &str) -> Span {
        let start = part.as_ptr() as usize - text.as_ptr() as usize;
        Span {
            start,
            end: start + part.len(),
        }
    }
}

/// A member name: where it is in the text, or unescaped when it has escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    At(Span),
    Unescaped(Box<str>),
}

/// A JSON object as its text and where each member is. Members are unique: as in a map,
/// a name given twice keeps its first place and its last value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonObject {
    text: Box<str>,
    members: Vec<(Name, Span)>,
}

impl JsonObject {
    /// Checks that `text` is a JSON object and locates its members.
    pub fn parse(text: String) -> Result<JsonObject, ObjectError> {
        use serde::Deserializer as _;
        let text = text.into_boxed_str();
        let mut de = serde_json::Deserializer::from_str(&text);
        let mut members = match de.deserialize_map(Members { text: &text }) {
            Ok(found) => found,
            Err(e) if e.classify() == serde_json::error::Category::Data => {
                // Another kind of value, unless the text is not JSON at all.
                return Err(match serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                    Ok(_) => ObjectError::NotObject,
                    Err(e) => ObjectError::Invalid(e),
                });
            }
            Err(e) => return Err(ObjectError::Invalid(e)),
        };
        de.end().map_err(ObjectError::Invalid)?;
        // A name given twice (rare): its last value in its first place.
        let mut i = 1;
        while i < members.len() {
            let name = name_in(&text, &members[i].0);
            match members[..i]
                .iter()
                .position(|(n, _)| name_in(&text, n) == name)
            {
                Some(first) => {
                    members[first].1 = members[i].1;
                    members.remove(i);
                }
                None => i += 1,
            }
        }
        Ok(JsonObject { text, members })
    }

    /// The object of a map.
    pub fn from_map(map: &Map<String, Value>) -> JsonObject {
        JsonObject::parse(serde_json::to_string(map).expect("a map serializes"))
            .expect("a map is an object")
    }

    /// The whole text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The text, taken.
    pub fn into_text(self) -> String {
        self.text.into()
    }

    /// Member `name`'s value.
    pub fn get(&self, name: &str) -> Option<RawJson<'_>> {
        Some(self.raw(self.position(name)?))
    }

    /// Where member `name` is among the members.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.members
            .iter()
            .position(|(n, _)| name_in(&self.text, n) == name)
    }

    /// Member `name`'s value, looked for at `place` first (where another object of the
    /// same shape has it).
    pub fn get_near(&self, name: &str, place: usize) -> Option<RawJson<'_>> {
        match self.members.get(place) {
            Some((n, _)) if name_in(&self.text, n) == name => Some(self.raw(place)),
            _ => self.get(name),
        }
    }

    fn raw(&self, i: usize) -> RawJson<'_> {
        let s = self.members[i].1;
        RawJson(&self.text[s.start..s.end])
    }

    /// The members, in order.
    pub fn members(&self) -> impl Iterator<Item = (&str, RawJson<'_>)> {
        (0..self.members.len()).map(|i| (name_in(&self.text, &self.members[i].0), self.raw(i)))
    }

    /// The object as a value.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

fn name_in<'a>(text: &'a str, name: &'a Name) -> &'a str {
    match name {
        Name::At(s) => &text[s.start..s.end],
        Name::Unescaped(s) => s,
    }
}

/// One JSON value's text (valid JSON: it comes from a checked object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawJson<'a>(&'a str);

impl<'a> RawJson<'a> {
    /// `text`, which must be one valid JSON value (as the members of a [`JsonObject`]).
    pub fn assume(text: &'a str) -> RawJson<'a> {
        RawJson(text)
    }

    /// The text.
    pub fn text(self) -> &'a str {
        self.0
    }

    /// `null`.
    pub fn is_null(self) -> bool {
        self.0 == "null"
    }

    /// A boolean.
    pub fn as_bool(self) -> Option<bool> {
        match self.0 {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    fn is_number(self) -> bool {
        matches!(self.0.as_bytes().first(), Some(b'-' | b'0'..=b'9'))
    }

    /// A number that is an integer in i64's range (as `serde_json`'s `as_i64`).
    pub fn as_i64(self) -> Option<i64> {
        // serde_json reads `-0` as a float.
        (self.is_number() && self.0 != "-0")
            .then(|| self.0.parse().ok())
            .flatten()
    }

    /// A number that is an integer in u64's range.
    pub fn as_u64(self) -> Option<u64> {
        self.is_number().then(|| self.0.parse().ok()).flatten()
    }

    /// A number.
    pub fn as_f64(self) -> Option<f64> {
        self.is_number().then(|| self.0.parse().ok()).flatten()
    }

    /// A string, borrowed from the text unless it has escapes.
    pub fn as_str(self) -> Option<Cow<'a, str>> {
        if !self.0.starts_with('"') {
            return None;
        }
        if !self.0.contains('\\') {
            return Some(Cow::Borrowed(&self.0[1..self.0.len() - 1]));
        }
        serde_json::from_str::<String>(self.0).ok().map(Cow::Owned)
    }

    /// The value.
    pub fn to_value(self) -> Value {
        serde_json::from_str(self.0).unwrap_or(Value::Null)
    }
}

/// Collects an object's member names and value positions, borrowing from the text.
struct Members<'a> {
    text: &'a str,
}

impl<'de> serde::de::Visitor<'de> for Members<'de> {
    type Value = Vec<(Name, Span)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(16));
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let value: &'de serde_json::value::RawValue = map.next_value()?;
            let name = match key {
                Key::Borrowed(s) => Name::At(Span::of(self.text, s)),
                Key::Owned(s) => Name::Unescaped(s.into()),
            };
            out.push((name, Span::of(self.text, value.get())));
        }
        Ok(out)
    }
}

/// A member name: borrowed from the text unless it had escapes.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(s))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"{"id": 42, "name": "a \"b\"", "amount": "12.50", "ratio": -1.5e2,
        "big": 18446744073709551615, "neg0": -0, "ok": true, "no": false, "gone": null,
        "nested": {"a": [1, 2]}, "caf\u00e9": "latte", "dup": 1, "dup": 2}"#;

    #[test]
    fn members_read_from_the_text_equal_the_parsed_values() {
        let o = JsonObject::parse(TEXT.to_string()).unwrap();
        let map: Map<String, Value> = serde_json::from_str(TEXT).unwrap();
        assert_eq!(o.to_value(), Value::Object(map.clone()));
        let names: Vec<&str> = o.members().map(|(n, _)| n).collect();
        let expected: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(names, expected, "unique names in a map's order");
        for (name, value) in &map {
            let raw = o.get(name).unwrap();
            assert_eq!(&raw.to_value(), value, "{name}");
            assert_eq!(raw.is_null(), value.is_null(), "{name}");
            assert_eq!(raw.as_bool(), value.as_bool(), "{name}");
            assert_eq!(raw.as_i64(), value.as_i64(), "{name}");
            assert_eq!(raw.as_u64(), value.as_u64(), "{name}");
            assert_eq!(raw.as_f64(), value.as_f64(), "{name}");
            assert_eq!(raw.as_str().as_deref(), value.as_str(), "{name}");
        }
        assert_eq!(
            o.get("dup").unwrap().text(),
            "2",
            "the last value of a name given twice"
        );
        assert!(o.get("missing").is_none());
        assert_eq!(JsonObject::from_map(&map).to_value(), Value::Object(map));
    }

    #[test]
    fn other_texts_are_refused_with_the_reason() {
        let err = |t: &str| JsonObject::parse(t.to_string()).unwrap_err().to_string();
        assert_eq!(err("[1, 2]"), "is not a JSON object");
        assert_eq!(err("\"text\""), "is not a JSON object");
        assert!(err(r#"{"a": 1"#).starts_with("is not valid JSON"));
        assert!(err(r#"{"a": 1} x"#).starts_with("is not valid JSON"));
        assert!(err("[1,").starts_with("is not valid JSON"));
        assert!(err(r#"{"a": tru}"#).starts_with("is not valid JSON"));
    }
}
