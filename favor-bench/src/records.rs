//! Result records: JSON through `serde_json` (keys keep their insertion order) and CSV through
//! the `csv` crate, behind the few constructors the result writers use.

/// A JSON value (`serde_json::Value`); build it with [`JsonExt`].
pub use serde_json::Value as Json;

/// Short constructors for result records. Non-finite numbers become `null`.
pub trait JsonExt {
    /// A string value.
    fn str(s: impl Into<String>) -> Json;
    /// A number (`null` when not finite).
    fn num(x: impl Into<f64>) -> Json;
    /// A number or `null`.
    fn opt(x: Option<f64>) -> Json;
    /// An object with keys in the given order.
    fn obj<K: Into<String>>(pairs: Vec<(K, Json)>) -> Json;
    /// Pretty-printed text with a trailing newline.
    fn pretty(&self) -> String;
}

impl JsonExt for Json {
    fn str(s: impl Into<String>) -> Json {
        Json::String(s.into())
    }

    fn num(x: impl Into<f64>) -> Json {
        // serde_json maps NaN and ±∞ to null.
        Json::from(x.into())
    }

    fn opt(x: Option<f64>) -> Json {
        x.map_or(Json::Null, Json::num)
    }

    fn obj<K: Into<String>>(pairs: Vec<(K, Json)>) -> Json {
        Json::Object(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    fn pretty(&self) -> String {
        // Serialising a Value cannot fail: its keys are strings and its numbers finite.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
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

    /// The table as text, after `comment` (lines starting with `#`, the run's metadata).
    pub fn render(&self, comment: &str) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        for row in std::iter::once(&self.header).chain(&self.rows) {
            // Writing into a Vec cannot fail.
            let _ = w.write_record(row);
        }
        let body = w.into_inner().map(String::from_utf8).ok().and_then(Result::ok).unwrap_or_default();
        format!("{comment}{body}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_valid_json_in_insertion_order() {
        let j = Json::obj(vec![
            ("b", Json::num(1.0)),
            ("a", Json::Array(vec![Json::num(0.5), Json::num(f64::NAN)])),
            ("c", Json::str("x\"y")),
        ]);
        let text = j.pretty();
        assert!(text.find("\"b\"").unwrap() < text.find("\"a\"").unwrap(), "{text}");
        let back: Json = serde_json::from_str(&text).unwrap();
        assert_eq!(back["a"][1], Json::Null);
        assert_eq!(back["c"], "x\"y");
    }

    #[test]
    fn csv_quotes_cells() {
        let mut c = Csv::new(&["a", "b"]);
        c.push(vec!["1,2".into(), "x".into()]);
        assert_eq!(c.render("# m\n"), "# m\na,b\n\"1,2\",x\n");
    }
}
