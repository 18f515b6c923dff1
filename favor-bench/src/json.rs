//! A minimal JSON value and writer: result files are flat records, so a serde stack is not worth
//! its build time here.

use std::fmt::Write;

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// null
    Null,
    /// true / false
    Bool(bool),
    /// A number; non-finite values are written as null.
    Num(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, keys in insertion order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// A string value.
    pub fn str(s: impl Into<String>) -> Self {
        Json::Str(s.into())
    }

    /// A number.
    pub fn num(x: impl Into<f64>) -> Self {
        Json::Num(x.into())
    }

    /// An optional number (`None` → null).
    pub fn opt(x: Option<f64>) -> Self {
        x.map_or(Json::Null, Json::Num)
    }

    /// An object from `(key, value)` pairs.
    pub fn obj<K: Into<String>>(pairs: Vec<(K, Json)>) -> Self {
        Json::Obj(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// Pretty-printed text with two-space indentation.
    pub fn pretty(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, 0);
        s.push('\n');
        s
    }

    fn write(&self, s: &mut String, indent: usize) {
        let pad = |s: &mut String, n: usize| s.extend(std::iter::repeat_n(' ', n));
        match self {
            Json::Null => s.push_str("null"),
            Json::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
            Json::Num(x) if x.is_finite() => {
                if x.fract() == 0.0 && x.abs() < 1e15 {
                    let _ = write!(s, "{}", *x as i64);
                } else {
                    let _ = write!(s, "{x:e}");
                }
            }
            Json::Num(_) => s.push_str("null"),
            Json::Str(t) => escape(s, t),
            Json::Arr(items) if items.iter().all(|i| matches!(i, Json::Num(_) | Json::Null)) => {
                // Numeric arrays stay on one line.
                s.push('[');
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        s.push_str(", ");
                    }
                    it.write(s, indent);
                }
                s.push(']');
            }
            Json::Arr(items) => {
                s.push_str("[\n");
                for (i, it) in items.iter().enumerate() {
                    pad(s, indent + 2);
                    it.write(s, indent + 2);
                    s.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                pad(s, indent);
                s.push(']');
            }
            Json::Obj(pairs) => {
                s.push_str("{\n");
                for (i, (k, v)) in pairs.iter().enumerate() {
                    pad(s, indent + 2);
                    escape(s, k);
                    s.push_str(": ");
                    v.write(s, indent + 2);
                    s.push_str(if i + 1 < pairs.len() { ",\n" } else { "\n" });
                }
                pad(s, indent);
                s.push('}');
            }
        }
    }
}

fn escape(s: &mut String, t: &str) {
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// A CSV table: header and rows of already-formatted cells.
#[derive(Debug, Clone, Default)]
pub struct Csv {
    /// Column names.
    pub header: Vec<String>,
    /// Rows, each as long as the header.
    pub rows: Vec<Vec<String>>,
}

impl Csv {
    /// An empty table with these columns.
    pub fn new(header: &[&str]) -> Self {
        Self { header: header.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    /// Appends a row.
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.header.len());
        self.rows.push(row);
    }

    /// The table as text, after `comment` (lines starting with `#`).
    pub fn render(&self, comment: &str) -> String {
        let cell = |c: &String| {
            if c.contains([',', '"', '\n']) { format!("\"{}\"", c.replace('"', "\"\"")) } else { c.clone() }
        };
        let mut s = comment.to_string();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            s.push_str(&row.iter().map(cell).collect::<Vec<_>>().join(","));
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_valid_json() {
        let j = Json::obj(vec![
            ("a", Json::num(1.0)),
            ("b", Json::Arr(vec![Json::num(0.5), Json::Num(f64::NAN)])),
            ("c", Json::str("x\"y")),
        ]);
        assert_eq!(j.pretty(), "{\n  \"a\": 1,\n  \"b\": [5e-1, null],\n  \"c\": \"x\\\"y\"\n}\n");
    }

    #[test]
    fn csv_quotes_cells() {
        let mut c = Csv::new(&["a", "b"]);
        c.push(vec!["1,2".into(), "x".into()]);
        assert_eq!(c.render("# m\n"), "# m\na,b\n\"1,2\",x\n");
    }
}
