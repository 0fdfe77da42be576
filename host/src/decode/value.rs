//! Column values: from PostgreSQL's text output form to their JSON form.
//!
//! Both the streaming path (pgoutput sends values as text) and the backfill (COPY text
//! format) arrive here, so a row reads the same whichever way it came. The session that
//! produces the text runs with `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`,
//! `extra_float_digits=3` and `bytea_output=hex` (see [`SESSION_OPTIONS`]), which the
//! conversions below rely on.
//!
//! | PostgreSQL | JSON |
//! | --- | --- |
//! | `smallint`, `integer`, `bigint`, `oid` | number |
//! | `numeric(p,s)` | string with the exact digits (`"1234.50"`); `"NaN"`, `"Infinity"` |
//! | `real`, `double precision` | number; `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | `boolean` | `true` / `false` |
//! | `text`, `varchar`, `char`, `name`, `citext`, enums | string |
//! | `timestamptz` | string, RFC 3339 UTC, microseconds: `"2024-05-01T12:00:00.250000Z"` |
//! | `timestamp` | string without zone: `"2024-05-01T12:00:00.250000"` |
//! | `date` | `"2024-05-01"` |
//! | `time` | `"12:00:00.250000"` |
//! | `uuid` | string |
//! | `json`, `jsonb` | the JSON value itself |
//! | `bytea` | string, standard base64 |
//! | arrays | JSON arrays (nested for several dimensions) of the element's form |
//! | anything else (interval, inet, money, ranges, ...) | string, as PostgreSQL prints it |
//!
//! `±infinity` timestamps and dates are the strings `"infinity"` / `"-infinity"`.

use std::collections::HashMap;

use base64::Engine as _;
use serde_json::{Number, Value};

/// Session settings that fix the text form of values (passed as connection options).
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 \
     -c extra_float_digits=3 -c bytea_output=hex";

/// How a type's text form becomes JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKind {
    /// `boolean`.
    Bool,
    /// Integer types.
    Integer,
    /// `real` and `double precision`.
    Float,
    /// `numeric`: kept as an exact decimal string.
    Numeric,
    /// `json` and `jsonb`.
    Json,
    /// `bytea`.
    Bytea,
    /// `timestamptz`.
    TimestampTz,
    /// `timestamp`.
    Timestamp,
    /// `date`.
    Date,
    /// `time`.
    Time,
    /// An array of the inner kind.
    Array(Box<TypeKind>),
    /// Everything else, kept as PostgreSQL prints it.
    Text,
}

/// Type OIDs of the builtin types we map, and their array types.
fn builtin(oid: u32) -> Option<TypeKind> {
    use TypeKind::*;
    let scalar = |oid| match oid {
        16 => Some(Bool),
        20 | 21 | 23 | 26 | 28 => Some(Integer),
        700 | 701 => Some(Float),
        1700 => Some(Numeric),
        114 | 3802 => Some(Json),
        17 => Some(Bytea),
        1184 => Some(TimestampTz),
        1114 => Some(Timestamp),
        1082 => Some(Date),
        1083 => Some(Time),
        18 | 19 | 25 | 1042 | 1043 | 2950 | 1186 | 1266 | 869 | 650 | 790 | 829 | 1560 | 1562
        | 3614 | 3615 => Some(Text),
        _ => None,
    };
    let array_of = |elem: u32| scalar(elem).map(|k| Array(Box::new(k)));
    scalar(oid).or(match oid {
        1000 => array_of(16),
        1005 => array_of(21),
        1007 => array_of(23),
        1016 => array_of(20),
        1028 => array_of(26),
        1021 => array_of(700),
        1022 => array_of(701),
        1231 => array_of(1700),
        199 => array_of(114),
        3807 => array_of(3802),
        1001 => array_of(17),
        1185 => array_of(1184),
        1115 => array_of(1114),
        1182 => array_of(1082),
        1183 => array_of(1083),
        2951 => array_of(2950),
        1002 | 1003 | 1009 | 1014 | 1015 | 1187 | 1270 | 1040 | 1041 | 651 => array_of(25),
        _ => None,
    })
}

/// Maps type OIDs to kinds: builtin types, plus what the database says about its own
/// types (enums, domains, arrays of those), loaded with [`TypeRegistry::describe`].
#[derive(Debug, Clone, Default)]
pub struct TypeRegistry {
    custom: HashMap<u32, TypeKind>,
}

/// What `pg_type` says about a non-builtin type.
#[derive(Debug, Clone)]
pub struct TypeDescription {
    /// Type OID.
    pub oid: u32,
    /// `typtype`: `b` base, `d` domain, `e` enum, `c` composite, `r` range, ...
    pub typtype: u8,
    /// Element type of an array type (0 when not an array, also for `point` and other
    /// fixed-length types that set `typelem`).
    pub element: u32,
    /// Base type of a domain (0 when not a domain).
    pub base: u32,
}

impl TypeRegistry {
    /// The SQL that lists the types [`TypeRegistry::describe`] needs, for the columns of
    /// the given tables (`$1` is an array of table OIDs). Columns: oid, typtype, typelem,
    /// typbasetype, each as text.
    pub const CATALOG_QUERY: &'static str = "\
        WITH RECURSIVE t(oid) AS ( \
            SELECT DISTINCT a.atttypid FROM pg_attribute a \
            WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped \
          UNION \
            SELECT x FROM t JOIN pg_type ty ON ty.oid = t.oid, \
              LATERAL (VALUES (ty.typelem), (ty.typbasetype)) v(x) WHERE x <> 0 \
        ) \
        SELECT ty.oid::text, ty.typtype::text, \
          (CASE WHEN ty.typcategory = 'A' THEN ty.typelem ELSE 0 END)::text, \
          ty.typbasetype::text \
        FROM t JOIN pg_type ty ON ty.oid = t.oid";

    /// Records non-builtin types.
    pub fn describe(&mut self, types: &[TypeDescription]) {
        let by_oid: HashMap<u32, &TypeDescription> = types.iter().map(|t| (t.oid, t)).collect();
        for t in types {
            if builtin(t.oid).is_none() {
                let kind = Self::resolve(t.oid, &by_oid, 0);
                self.custom.insert(t.oid, kind);
            }
        }
    }

    fn resolve(oid: u32, by_oid: &HashMap<u32, &TypeDescription>, depth: u8) -> TypeKind {
        if let Some(kind) = builtin(oid) {
            return kind;
        }
        let Some(t) = by_oid.get(&oid) else {
            return TypeKind::Text;
        };
        if depth > 8 {
            return TypeKind::Text;
        }
        if t.typtype == b'd' && t.base != 0 {
            return Self::resolve(t.base, by_oid, depth + 1);
        }
        // The catalog query gives an element only for array types (typcategory `A`):
        // fixed-length types such as `point` and `box` also set typelem, but their text
        // is not an array literal.
        if t.element != 0 && t.typtype == b'b' {
            let elem = Self::resolve(t.element, by_oid, depth + 1);
            return TypeKind::Array(Box::new(elem));
        }
        TypeKind::Text
    }

    /// Whether the kind of type `oid` is known (builtin, or described).
    pub fn knows(&self, oid: u32) -> bool {
        builtin(oid).is_some() || self.custom.contains_key(&oid)
    }

    /// The kind of a type OID; unknown types are text.
    pub fn kind(&self, oid: u32) -> TypeKind {
        builtin(oid)
            .or_else(|| self.custom.get(&oid).cloned())
            .unwrap_or(TypeKind::Text)
    }
}

/// Converts a value's text form to its JSON form. Text that does not parse as its type
/// (which PostgreSQL never sends) is kept as a string rather than lost.
pub fn to_json(kind: &TypeKind, text: &str) -> Value {
    match kind {
        TypeKind::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.to_string()),
        },
        TypeKind::Integer => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_string())),
        TypeKind::Float => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_string())),
        TypeKind::Json => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        }
        TypeKind::Bytea => match decode_hex_bytea(text) {
            Some(bytes) => Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            None => Value::String(text.to_string()),
        },
        TypeKind::TimestampTz => Value::String(timestamp(text, true)),
        TypeKind::Timestamp => Value::String(timestamp(text, false)),
        TypeKind::Time => Value::String(pad_fraction(text)),
        TypeKind::Numeric | TypeKind::Date | TypeKind::Text => Value::String(text.to_string()),
        TypeKind::Array(elem) => match parse_array(text, elem) {
            Some(v) => v,
            None => Value::String(text.to_string()),
        },
    }
}

/// [`to_json`], and for a json or jsonb value whose parsed form does not keep every
/// number digit for digit (`12345678901234567890.5`, `1.50`, `1e400`, which an `f64`
/// cannot hold as written) or that is a JSON `null` (not SQL NULL), its exact JSON text,
/// without the spaces between tokens. The
/// document serializes and the lake stores that text in place of the parsed value.
pub fn to_json_exact(kind: &TypeKind, text: &str) -> (Value, Option<Box<str>>) {
    let value = to_json(kind, text);
    if !matches!(kind, TypeKind::Json) {
        let exact = match kind {
            TypeKind::Array(elem) if matches!(**elem, TypeKind::Json) => array_exact(text),
            _ => None,
        };
        return (value, exact.map(String::into_boxed_str));
    }
    // A string is what a text that does not parse becomes (`1e400`); a JSON string is
    // quoted in the text.
    let parsed = !matches!(&value, Value::String(s) if !text.trim_start().starts_with('"'));
    // A JSON `null` is not SQL NULL: its text says which it is.
    let exact = if value.is_null() {
        Some("null".into())
    } else if parsed && numbers_kept(text, &value) {
        None
    } else {
        Some(compact_json(text).into_boxed_str())
    };
    (value, exact)
}

/// Whether the numbers of JSON `text`, in order, are those of `value` as serde_json
/// writes them.
fn numbers_kept(text: &str, value: &Value) -> bool {
    let mut tokens = number_tokens(text);
    fn walk<'a>(v: &Value, tokens: &mut impl Iterator<Item = &'a str>) -> bool {
        match v {
            Value::Number(n) => tokens.next().is_some_and(|t| n.to_string() == t),
            Value::Array(items) => items.iter().all(|i| walk(i, tokens)),
            Value::Object(map) => map.values().all(|i| walk(i, tokens)),
            _ => true,
        }
    }
    walk(value, &mut tokens) && tokens.next().is_none()
}

/// The number tokens of JSON `text`, outside strings, in order.
fn number_tokens(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bytes.len() {
            match bytes[i] {
                b'"' => {
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'"' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                b'-' | b'0'..=b'9' => {
                    let start = i;
                    while i < bytes.len()
                        && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                    {
                        i += 1;
                    }
                    return Some(&text[start..i]);
                }
                _ => i += 1,
            }
        }
        None
    })
}

/// JSON `text` without the whitespace between its tokens (strings kept as they are).
fn compact_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

fn decode_hex_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// `2024-05-01 12:00:00.25+00` becomes `2024-05-01T12:00:00.250000Z`.
fn timestamp(text: &str, with_zone: bool) -> String {
    let Some((date, time)) = text.split_once(' ') else {
        return text.to_string();
    };
    let time = if with_zone {
        // TimeZone=UTC: the offset is always +00 (BC dates end in " BC" and stay as text).
        match time.strip_suffix("+00") {
            Some(t) => t,
            None => return text.to_string(),
        }
    } else {
        time
    };
    let mut out = String::with_capacity(date.len() + 17);
    out.push_str(date);
    out.push('T');
    if !push_padded_time(&mut out, time) {
        return text.to_string();
    }
    if with_zone {
        out.push('Z');
    }
    out
}

/// `12:00:00.25` becomes `12:00:00.250000`; `12:00:00` becomes `12:00:00.000000`.
fn pad_fraction(time: &str) -> String {
    let mut out = String::with_capacity(15);
    if push_padded_time(&mut out, time) {
        out
    } else {
        time.to_string()
    }
}

/// Appends `HH:MM:SS.ffffff`; false when `time` is not of the form `HH:MM:SS[.f{1,6}]`.
fn push_padded_time(out: &mut String, time: &str) -> bool {
    let (whole, frac) = time.split_once('.').unwrap_or((time, ""));
    if whole.len() != 8 || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    out.push_str(whole);
    out.push('.');
    out.push_str(frac);
    for _ in frac.len()..6 {
        out.push('0');
    }
    true
}

/// Parses PostgreSQL's array literal (`{1,2,NULL}`, `{{a,b},{c,d}}`, `[0:1]={x,y}`).
fn parse_array(text: &str, elem: &TypeKind) -> Option<Value> {
    walk_array(
        text,
        &mut |item| match item {
            None => Value::Null,
            Some(s) => to_json(elem, s),
        },
        &mut Value::Array,
    )
}

/// Walks the text of an array (`{1,NULL,"a b"}`, `[0:1]={...}`, nested), turning each
/// element (`None`: NULL) with `leaf` and each (sub-)array's items with `list`.
fn walk_array<T>(
    text: &str,
    leaf: &mut dyn FnMut(Option<&str>) -> T,
    list: &mut dyn FnMut(Vec<T>) -> T,
) -> Option<T> {
    let body = match text.find('=') {
        Some(eq) if text.starts_with('[') => &text[eq + 1..],
        _ => text,
    };
    let mut chars = body.chars().peekable();
    let value = walk_level(&mut chars, leaf, list, 0)?;
    chars.next().is_none().then_some(value)
}

fn walk_level<T>(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    leaf: &mut dyn FnMut(Option<&str>) -> T,
    list: &mut dyn FnMut(Vec<T>) -> T,
    depth: u8,
) -> Option<T> {
    if depth > 6 || chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(list(items));
    }
    loop {
        match chars.peek()? {
            '{' => items.push(walk_level(chars, leaf, list, depth + 1)?),
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '\\' => s.push(chars.next()?),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(leaf(Some(&s)));
            }
            _ => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                if s == "NULL" {
                    items.push(leaf(None));
                } else {
                    items.push(leaf(Some(s.trim())));
                }
            }
        }
        match chars.next()? {
            ',' => continue,
            '}' => return Some(list(items)),
            _ => return None,
        }
    }
}

/// Of an array of json or jsonb (`kind` holds json), its exact JSON text when an
/// element's parsed form does not keep its numbers digit for digit: the array of the
/// elements' exact texts (a NULL element, or a JSON `null`, as `null`).
fn array_exact(text: &str) -> Option<String> {
    let mut needed = false;
    let exact = walk_array(
        text,
        &mut |item| match item {
            None => "null".to_string(),
            Some(s) => match to_json_exact(&TypeKind::Json, s) {
                (v, None) => v.to_string(),
                (v, Some(_)) if v.is_null() => "null".to_string(),
                (_, Some(exact)) => {
                    needed = true;
                    exact.into()
                }
            },
        },
        &mut |items| format!("[{}]", items.join(",")),
    )?;
    needed.then_some(exact)
}

/// Undoes the escaping of one field in COPY's text format (`\N` is handled by the caller).
pub fn unescape_copy_field(field: &[u8]) -> Vec<u8> {
    if !field.contains(&b'\\') {
        return field.to_vec();
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' || i == field.len() {
            out.push(b);
            continue;
        }
        let c = field[i];
        i += 1;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u8;
                let mut digits = 0;
                while digits < 2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d as u8;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.push(b'x');
                } else {
                    out.push(v);
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(oid: u32, text: &str) -> Value {
        to_json(&TypeRegistry::default().kind(oid), text)
    }

    #[test]
    fn json_numbers_an_f64_cannot_hold_keep_their_exact_text() {
        let jsonb = TypeKind::Json;
        let exact = |text: &str| to_json_exact(&jsonb, text).1.map(String::from);
        assert_eq!(exact(r#"{"a": 1, "b": [0.1, -2, 2.5], "c": "1.50"}"#), None);
        assert_eq!(
            exact("12345678901234567890123"),
            Some("12345678901234567890123".into())
        );
        assert_eq!(
            exact(r#"{"amount": 1234567890123456789.25, "note": "a b"}"#),
            Some(r#"{"amount":1234567890123456789.25,"note":"a b"}"#.into())
        );
        assert_eq!(exact(r#"[1.50]"#), Some("[1.50]".into()));
        let (value, text) = to_json_exact(&jsonb, r#"{"x": 1e400}"#);
        assert_eq!(text.as_deref(), Some(r#"{"x":1e400}"#));
        assert!(value.is_string(), "{value}");
        // A JSON string that looks like a number is a string, exactly.
        assert_eq!(to_json_exact(&jsonb, r#""1e400""#), (json!("1e400"), None));
        // Escaped quotes inside strings do not end them.
        assert_eq!(exact(r#"{"k\"1": "v\" 2", "n": 3}"#), None);
        assert_eq!(to_json_exact(&TypeKind::Numeric, "1.50").1, None);
        assert_eq!(
            to_json_exact(&jsonb, "null"),
            (json!(null), Some("null".into()))
        );
    }

    #[test]
    fn arrays_of_json_keep_their_elements_exact_text() {
        let array = TypeKind::Array(Box::new(TypeKind::Json));
        let exact = |text: &str| to_json_exact(&array, text).1.map(String::from);
        // Nothing an f64 loses: the parsed elements are enough.
        assert_eq!(exact(r#"{"1","\"s\"","{\"a\": [1, 2.5]}"}"#), None);
        assert_eq!(
            exact(r#"{"12345678901234567890.5",NULL,"{\"x\": 1.50}","[2, 3.0]",null}"#),
            Some(r#"[12345678901234567890.5,null,{"x":1.50},[2,3.0],null]"#.into())
        );
        assert_eq!(
            exact(r#"{{"1.50","2"},{"\"t\"",NULL}}"#),
            Some(r#"[[1.50,2],["t",null]]"#.into())
        );
        assert_eq!(exact(r#"[0:0]={"1e400"}"#), Some("[1e400]".into()));
        // Each element lands as its own text; a NULL one (or JSON null) as NULL.
        assert_eq!(
            crate::sink::delta::schema::exact_json_as_text(
                &array,
                r#"[12345678901234567890.5,null,{"x":1.50}]"#
            ),
            json!(["12345678901234567890.5", null, r#"{"x":1.50}"#])
        );
    }

    #[test]
    fn scalars() {
        assert_eq!(conv(23, "42"), json!(42));
        assert_eq!(conv(20, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(
            conv(1700, "12345678901234567890.12"),
            json!("12345678901234567890.12")
        );
        assert_eq!(conv(701, "0.1"), json!(0.1));
        assert_eq!(conv(701, "NaN"), json!("NaN"));
        assert_eq!(conv(700, "-Infinity"), json!("-Infinity"));
        assert_eq!(conv(16, "t"), json!(true));
        assert_eq!(conv(3802, r#"{"a": [1, 2]}"#), json!({"a": [1, 2]}));
        assert_eq!(conv(17, "\\x00ff10"), json!("AP8Q"));
        assert_eq!(
            conv(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
    }

    #[test]
    fn times() {
        assert_eq!(
            conv(1184, "2024-05-01 12:00:00.25+00"),
            json!("2024-05-01T12:00:00.250000Z")
        );
        assert_eq!(
            conv(1184, "2024-05-01 12:00:00+00"),
            json!("2024-05-01T12:00:00.000000Z")
        );
        assert_eq!(
            conv(1114, "2024-05-01 12:00:00.123456"),
            json!("2024-05-01T12:00:00.123456")
        );
        assert_eq!(conv(1184, "infinity"), json!("infinity"));
        assert_eq!(conv(1082, "2024-05-01"), json!("2024-05-01"));
        assert_eq!(conv(1083, "23:59:59.5"), json!("23:59:59.500000"));
    }

    #[test]
    fn arrays() {
        assert_eq!(conv(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(conv(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            conv(1009, r#"{a,"b c","q\"uote",NULL,"NULL"}"#),
            json!(["a", "b c", "q\"uote", null, "NULL"])
        );
        assert_eq!(conv(1009, "{}"), json!([]));
        assert_eq!(conv(1007, "[0:1]={7,8}"), json!([7, 8]));
        assert_eq!(conv(1231, "{1.50,2}"), json!(["1.50", "2"]));
        // Broken literal: kept as text, never lost.
        assert_eq!(conv(1007, "{1,2"), json!("{1,2"));
    }

    #[test]
    fn custom_types_resolve_through_the_catalog() {
        let mut reg = TypeRegistry::default();
        reg.describe(&[
            TypeDescription {
                oid: 90001,
                typtype: b'e',
                element: 0,
                base: 0,
            },
            TypeDescription {
                oid: 90002,
                typtype: b'b',
                element: 90001,
                base: 0,
            },
            TypeDescription {
                oid: 90003,
                typtype: b'd',
                element: 0,
                base: 1700,
            },
        ]);
        assert_eq!(reg.kind(90001), TypeKind::Text);
        assert_eq!(reg.kind(90002), TypeKind::Array(Box::new(TypeKind::Text)));
        assert_eq!(reg.kind(90003), TypeKind::Numeric);
        assert_eq!(reg.kind(99999), TypeKind::Text);
    }

    #[test]
    fn copy_escapes() {
        assert_eq!(unescape_copy_field(b"a\\tb\\\\c\\nd"), b"a\tb\\c\nd");
        assert_eq!(unescape_copy_field(b"\\101\\x42"), b"AB");
        assert_eq!(unescape_copy_field(b"plain"), b"plain");
        assert_eq!(unescape_copy_field(b"end\\"), b"end\\");
    }
}
