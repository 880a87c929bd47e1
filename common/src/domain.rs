//! Domain types parsed from protobuf input at the edge: once a value is one of
//! these, it is valid, and the stores never see a raw proto or unchecked
//! string. The limits here are the whole system's input contract; the
//! orchestrator parses orders with the same types.

use std::collections::HashSet;
use std::fmt;

use crate::error::Error;

/// Longest identifier accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most units of one product in one order or reservation.
pub const MAX_QUANTITY: i32 = 10_000;
/// Most distinct items in one order or reservation.
pub const MAX_ITEMS: usize = 100;
/// Highest unit price and stock level accepted (10^12).
pub const MAX_PRICE_OR_STOCK: i64 = 1_000_000_000_000;
/// Highest balance or charge accepted, in cents (10^15).
pub const MAX_MONEY_CENTS: i64 = 1_000_000_000_000_000;
/// Longest product name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// An identifier (saga, product, customer): 1..=128 bytes, no control
/// characters, no leading or trailing white space.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(String);

impl Id {
    /// Parses `value` as the identifier named `field` (the name is used in
    /// the error message only).
    pub fn parse(field: &str, value: String) -> Result<Self, Error> {
        if value.is_empty() {
            return Err(Error::invalid(format!("{field} is required")));
        }
        if value.len() > MAX_ID_BYTES {
            return Err(Error::invalid(format!(
                "{field} is {} bytes long; the limit is {MAX_ID_BYTES}",
                value.len()
            )));
        }
        if value
            .chars()
            .any(|c| c.is_control() || is_invisible_format(c))
            || value.trim() != value
        {
            return Err(Error::invalid(format!(
                "{field} must not contain control characters, invisible format characters \
                 (such as bidi overrides) or surrounding white space"
            )));
        }
        Ok(Self(value))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Gives the inner string back.
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A number of units: 1..=10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(i32);

impl Quantity {
    /// Parses a quantity for `product` (named in the error message).
    pub fn parse(product: &Id, value: i32) -> Result<Self, Error> {
        if (1..=MAX_QUANTITY).contains(&value) {
            Ok(Self(value))
        } else {
            Err(Error::invalid(format!(
                "quantity of product {product} is {value}; it must be between 1 and {MAX_QUANTITY}"
            )))
        }
    }

    /// The number of units.
    pub fn get(self) -> i32 {
        self.0
    }
}

/// An amount of money in cents, between 0 and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cents(i64);

impl Cents {
    /// Parses the amount named `field`, which must lie in `0..=max`.
    pub fn parse(field: &str, value: i64, max: i64) -> Result<Self, Error> {
        if (0..=max).contains(&value) {
            Ok(Self(value))
        } else {
            Err(Error::invalid(format!(
                "{field} is {value}; it must be between 0 and {max}"
            )))
        }
    }

    /// The amount in cents.
    pub fn get(self) -> i64 {
        self.0
    }
}

/// A product and how many units of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The product.
    pub product_id: Id,
    /// Units of it.
    pub quantity: Quantity,
}

/// A non-empty list of at most 100 items with distinct products, in the
/// order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Items(Vec<Item>);

impl Items {
    /// Parses `(product_id, quantity)` pairs.
    pub fn parse(raw: impl IntoIterator<Item = (String, i32)>) -> Result<Self, Error> {
        let mut items = Vec::new();
        let mut seen = HashSet::new();
        for (index, (product_id, quantity)) in raw.into_iter().enumerate() {
            if index >= MAX_ITEMS {
                return Err(Error::invalid(format!(
                    "too many items; the limit is {MAX_ITEMS}"
                )));
            }
            let product_id = Id::parse(&format!("items[{index}].product_id"), product_id)?;
            let quantity = Quantity::parse(&product_id, quantity)?;
            if !seen.insert(product_id.clone()) {
                return Err(Error::invalid(format!(
                    "product {product_id} appears more than once; list it once with the total quantity"
                )));
            }
            items.push(Item {
                product_id,
                quantity,
            });
        }
        if items.is_empty() {
            return Err(Error::invalid("items must not be empty"));
        }
        Ok(Self(items))
    }

    /// The items in the order given.
    pub fn as_slice(&self) -> &[Item] {
        &self.0
    }

    /// Product ids and quantities as two columns, sorted by product id: the
    /// shape the stores bind as arrays, and the order rows are locked in, so
    /// that concurrent multi-item calls cannot deadlock.
    pub fn sorted_columns(&self) -> (Vec<String>, Vec<i64>) {
        let mut sorted: Vec<&Item> = self.0.iter().collect();
        sorted.sort_by(|a, b| a.product_id.cmp(&b.product_id));
        sorted
            .into_iter()
            .map(|item| {
                (
                    item.product_id.as_str().to_owned(),
                    i64::from(item.quantity.get()),
                )
            })
            .unzip()
    }
}

/// Records per page of a keyset listing when the request says 0.
pub const DEFAULT_PAGE_SIZE: i32 = 100;
/// Most records per page of a keyset listing.
pub const MAX_PAGE_SIZE: i32 = 1000;

/// One page of a listing ordered by saga id, parsed from `page_size` and
/// `page_token` (the last saga id of the previous page, opaque to clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    size: i64,
    after: Option<Id>,
}

impl Page {
    /// Parses a request's paging fields: the size must be 0 (the default,
    /// [`DEFAULT_PAGE_SIZE`]) or 1..=[`MAX_PAGE_SIZE`], the token empty or
    /// a saga id.
    pub fn parse(page_size: i32, page_token: String) -> Result<Self, Error> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n @ 1..=MAX_PAGE_SIZE => n,
            n => {
                return Err(Error::invalid(format!(
                    "page_size is {n}; it must be between 1 and {MAX_PAGE_SIZE} (0 for {DEFAULT_PAGE_SIZE})"
                )));
            }
        };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(Id::parse("page_token", page_token).map_err(|_| {
                Error::invalid(
                    "page_token is not one this listing gave out; start with an empty one",
                )
            })?)
        };
        Ok(Self {
            size: i64::from(size),
            after,
        })
    }

    /// Records on this page.
    pub fn size(&self) -> i64 {
        self.size
    }

    /// The key the page starts after; empty for the first page (every saga
    /// id sorts after the empty string).
    pub fn after(&self) -> &str {
        self.after.as_ref().map_or("", Id::as_str)
    }

    /// Cuts `rows`, fetched with a limit of `size() + 1` so that one more
    /// row tells whether there is a next page, to the page, and gives the
    /// token of the next page (empty when this is the last).
    pub fn finish<T>(&self, mut rows: Vec<T>, key: impl Fn(&T) -> &str) -> (Vec<T>, String) {
        let size = usize::try_from(self.size).unwrap_or(usize::MAX);
        if rows.len() > size {
            rows.truncate(size);
            let token = rows
                .last()
                .map(|row| key(row).to_owned())
                .unwrap_or_default();
            (rows, token)
        } else {
            (rows, String::new())
        }
    }
}

/// Checks a free-text field's length.
pub fn bounded_text(field: &str, value: String, max: usize) -> Result<String, Error> {
    if value.len() > max {
        return Err(Error::invalid(format!(
            "{field} is {} bytes long; the limit is {max}",
            value.len()
        )));
    }
    // Free text may hold line breaks and tabs; nothing else invisible: a
    // NUL cannot be stored, and bidi overrides would spoof what operators
    // read.
    if let Some((at, c)) = value
        .char_indices()
        .find(|&(_, c)| (c.is_control() && c != '\n' && c != '\t') || is_invisible_format(c))
    {
        return Err(Error::invalid(format!(
            "{field} contains U+{:04X} at byte {at}: control and invisible format characters \
             are not accepted",
            c as u32
        )));
    }
    Ok(value)
}

/// Unicode format characters that change how text around them is shown
/// without being seen themselves: bidi embeddings, overrides and isolates,
/// zero-width characters, the byte-order mark and the like (category Cf).
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// 64 random bits from the standard library's randomly seeded hasher: fine
/// for ids, jitter and choosing which calls a fault hits (not for secrets).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS once per process and perturbed per
    // instance; hashing a process-wide counter makes every call distinct.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// A new identifier: `prefix`, then 32 hex digits: 48 bits of milliseconds
/// since the epoch, a 16-bit sequence number, and 64 random bits. Ids made
/// by one process sort in creation order (the sequence orders ids of the
/// same millisecond); ids of different processes sort by millisecond.
pub fn new_id(prefix: &str) -> String {
    use std::sync::Mutex;
    use std::time::{SystemTime, UNIX_EPOCH};

    static LAST: Mutex<(u64, u64)> = Mutex::new((0, 0));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (millis, sequence) = {
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        *last = match *last {
            // The clock went back or stood still: keep counting from the last id.
            (millis, sequence) if now <= millis && sequence < 0xffff => (millis, sequence + 1),
            (millis, _) if now <= millis => (millis + 1, 0),
            _ => (now, 0),
        };
        *last
    };
    format!(
        "{prefix}_{:012x}{sequence:04x}{:016x}",
        millis & 0xffff_ffff_ffff,
        random_u64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(raw: &[(&str, i32)]) -> Result<Items, Error> {
        Items::parse(raw.iter().map(|(p, q)| (p.to_string(), *q)))
    }

    #[test]
    fn ids_are_bounded_and_clean() {
        assert!(Id::parse("saga_id", "a".repeat(128)).is_ok());
        assert!(Id::parse("saga_id", "a".repeat(129)).is_err());
        assert!(Id::parse("saga_id", String::new()).is_err());
        assert!(Id::parse("saga_id", " padded".into()).is_err());
        assert!(Id::parse("saga_id", "tab\there".into()).is_err());
    }

    #[test]
    fn items_reject_every_bad_shape() {
        assert!(items(&[("p1", 1), ("p2", 10_000)]).is_ok());
        assert!(items(&[]).is_err());
        assert!(items(&[("p1", 0)]).is_err());
        assert!(items(&[("p1", -1)]).is_err());
        assert!(items(&[("p1", 10_001)]).is_err());
        assert!(items(&[("p1", 1), ("p1", 2)]).is_err());
        let many: Vec<(String, i32)> = (0..101).map(|i| (format!("p{i}"), 1)).collect();
        assert!(Items::parse(many.clone()).is_err());
        assert!(Items::parse(many.into_iter().take(100)).is_ok());
    }

    #[test]
    fn sorted_columns_sort_by_product() {
        let parsed = items(&[("b", 2), ("a", 1)]).unwrap();
        assert_eq!(
            parsed.sorted_columns(),
            (vec!["a".to_string(), "b".to_string()], vec![1, 2])
        );
    }

    #[test]
    fn pages_parse_sizes_and_tokens_and_cut_one_extra_row() {
        let first = Page::parse(0, String::new()).unwrap();
        assert_eq!((first.size(), first.after()), (100, ""));
        let next = Page::parse(2, "s2".into()).unwrap();
        assert_eq!((next.size(), next.after()), (2, "s2"));
        assert!(Page::parse(1000, String::new()).is_ok());
        for bad in [-1, 1001, i32::MAX] {
            assert!(Page::parse(bad, String::new()).is_err(), "{bad}");
        }
        for bad in [" s1", "a\tb", &"x".repeat(129)] {
            assert!(Page::parse(0, bad.to_owned()).is_err(), "{bad:?}");
        }
        let rows = vec!["s3", "s4", "s5"];
        assert_eq!(
            next.finish(rows, |r| r),
            (vec!["s3", "s4"], "s4".to_owned())
        );
        assert_eq!(next.finish(vec!["s3"], |r| r), (vec!["s3"], String::new()));
        assert_eq!(
            next.finish(vec!["s3", "s4"], |r| r),
            (vec!["s3", "s4"], String::new())
        );
    }

    #[test]
    fn new_ids_are_unique_and_sort_in_creation_order() {
        let ids: Vec<String> = (0..5000).map(|_| new_id("x")).collect();
        assert!(ids.iter().all(|id| id.len() == 2 + 32));
        // Thousands per millisecond: the sequence keeps them ordered.
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids sort in creation order"
        );
    }
}
