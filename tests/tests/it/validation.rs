//! Input validation of the four requests that start work, against the
//! contract restated in `harness::contract`, over generated requests that
//! crowd its edges; the same checks the fuzz targets run (`fuzz/`), which
//! run here too, over random bytes, so the suite builds and exercises them.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tonic::Status;

use harness::fuzz::{
    check_charge, check_place_order, check_place_order_with, check_reserve, check_ship,
    check_traceparent,
};
use orchestrator::api::{ValidOrder, validate_place_order};
use proto::fulfillment::v1 as fulfillment;
use proto::inventory::v1 as inventory;
use proto::payment::v1 as payment;
use proto::saga::v1 as saga;

/// A character that is refused somewhere in an id, or only at its ends, or
/// allowed (multi-byte).
fn odd_char() -> impl Strategy<Value = char> {
    prop::sample::select(vec![
        '\0', '\n', '\t', ' ', '\u{7f}', '\u{85}', '\u{ad}', '\u{200b}', '\u{202e}', '\u{2066}',
        '\u{feff}', '\u{3000}', 'é', '€',
    ])
}

/// Ids on both sides of every rule: short and plain, around 128 bytes (in
/// one-byte and two-byte characters), empty, or with an odd character at
/// the start, the middle or the end.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        16 => "[a-z0-9_.-]{1,16}",
        1 => "[a-z]{126,130}",
        1 => "é{62,66}",
        1 => Just(String::new()),
        3 => ("[a-z]{0,3}", odd_char(), "[a-z]{0,3}")
            .prop_map(|(head, odd, tail)| format!("{head}{odd}{tail}")),
    ]
}

fn quantity() -> impl Strategy<Value = i32> {
    prop_oneof![
        12 => 1..=10_000i32,
        1 => prop::sample::select(vec![i32::MIN, -1, 0, 1, 10_000, 10_001, i32::MAX]),
    ]
}

/// Item lists: a few items of any id and quantity, sometimes with a
/// product repeated, or 99 to 101 plain ones, or none.
fn items() -> impl Strategy<Value = Vec<(String, i32)>> {
    let few = (
        prop::collection::vec((id(), quantity()), 1..5),
        any::<bool>(),
    )
        .prop_map(|(mut items, repeat)| {
            if repeat && items.len() > 1 {
                items[1].0 = items[0].0.clone();
            }
            items
        });
    prop_oneof![
        8 => few,
        1 => (99usize..=101).prop_map(|n| (0..n).map(|i| (format!("p{i}"), 1)).collect()),
        1 => Just(Vec::new()),
    ]
}

fn idempotency_key() -> impl Strategy<Value = String> {
    prop_oneof![
        5 => Just(String::new()),
        3 => "[a-z0-9\n\t -]{1,12}",
        1 => "[a-z]{127,129}",
        2 => ("[a-z]{0,3}", odd_char()).prop_map(|(head, odd)| format!("{head}{odd}")),
    ]
}

fn amount() -> impl Strategy<Value = i64> {
    const MAX: i64 = 1_000_000_000_000_000;
    prop_oneof![
        4 => 0..=MAX,
        1 => prop::sample::select(vec![i64::MIN, -1, 0, MAX, MAX + 1, i64::MAX]),
    ]
}

fn place_order_request() -> impl Strategy<Value = saga::PlaceOrderRequest> {
    (id(), items(), idempotency_key()).prop_map(|(customer_id, items, idempotency_key)| {
        saga::PlaceOrderRequest {
            customer_id,
            items: items
                .into_iter()
                .map(|(product_id, quantity)| saga::OrderItem {
                    product_id,
                    quantity,
                })
                .collect(),
            idempotency_key,
        }
    })
}

fn reserve_request() -> impl Strategy<Value = inventory::ReserveRequest> {
    (id(), items()).prop_map(|(saga_id, items)| inventory::ReserveRequest {
        saga_id,
        items: items
            .into_iter()
            .map(|(product_id, quantity)| inventory::Item {
                product_id,
                quantity,
            })
            .collect(),
    })
}

fn charge_request() -> impl Strategy<Value = payment::ChargeRequest> {
    (id(), id(), amount()).prop_map(
        |(saga_id, customer_id, amount_cents)| payment::ChargeRequest {
            saga_id,
            customer_id,
            amount_cents,
        },
    )
}

fn ship_request() -> impl Strategy<Value = fulfillment::ShipRequest> {
    (id(), items()).prop_map(|(saga_id, items)| fulfillment::ShipRequest {
        saga_id,
        items: items
            .into_iter()
            .map(|(product_id, quantity)| fulfillment::Item {
                product_id,
                quantity,
            })
            .collect(),
    })
}

/// `traceparent` headers: well formed, or one field off.
fn traceparent() -> impl Strategy<Value = String> {
    let hex = |n: usize| prop::string::string_regex(&format!("[0-9a-f]{{{n}}}")).unwrap();
    let field = |n: usize| {
        prop_oneof![
            6 => hex(n),
            1 => prop::string::string_regex(&format!("[0-9a-fA-F]{{{}}}", n)).unwrap(),
            1 => prop::string::string_regex(&format!("[0-9a-f]{{{},{}}}", n - 1, n + 1)).unwrap(),
            1 => Just("0".repeat(n)),
        ]
    };
    (
        prop_oneof![4 => Just("00".to_owned()), 1 => field(2)],
        field(32),
        field(16),
        field(2),
        prop_oneof![4 => Just(String::new()), 1 => Just("-more".to_owned())],
        prop_oneof![4 => Just(""), 1 => Just(" ")],
    )
        .prop_map(|(version, trace, span, flags, extra, pad)| {
            format!("{pad}{version}-{trace}-{span}-{flags}{extra}{pad}")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn place_order_is_accepted_exactly_inside_the_contract(request in place_order_request()) {
        let checked = check_place_order(request);
        prop_assert!(checked.is_ok(), "{}", checked.unwrap_err());
    }

    #[test]
    fn reserve_is_accepted_exactly_inside_the_contract(request in reserve_request()) {
        let checked = check_reserve(request);
        prop_assert!(checked.is_ok(), "{}", checked.unwrap_err());
    }

    #[test]
    fn charge_is_accepted_exactly_inside_the_contract(request in charge_request()) {
        let checked = check_charge(request);
        prop_assert!(checked.is_ok(), "{}", checked.unwrap_err());
    }

    #[test]
    fn ship_is_accepted_exactly_inside_the_contract(request in ship_request()) {
        let checked = check_ship(request);
        prop_assert!(checked.is_ok(), "{}", checked.unwrap_err());
    }

    #[test]
    fn a_traceparent_is_read_exactly_in_its_w3c_form(header in traceparent()) {
        let checked = check_traceparent(&header);
        prop_assert!(checked.is_ok(), "{}", checked.unwrap_err());
    }

    #[test]
    fn the_fuzz_targets_hold_on_random_bytes(data in prop::collection::vec(any::<u8>(), 0..400)) {
        harness::fuzz::place_order(&data);
        harness::fuzz::reserve(&data);
        harness::fuzz::charge(&data);
        harness::fuzz::ship(&data);
        harness::fuzz::saga_machine(&data);
    }
}

/// How many of `cases` generated values the contract accepts.
fn accepted<T: std::fmt::Debug>(
    strategy: impl Strategy<Value = T>,
    check: impl Fn(T) -> Result<bool, String>,
) -> usize {
    let mut runner = TestRunner::deterministic();
    (0..1000)
        .filter(|_| {
            let value = strategy.new_tree(&mut runner).unwrap().current();
            check(value).unwrap()
        })
        .count()
}

#[test]
fn the_generated_requests_fall_on_both_sides_of_the_contract() {
    // Neither side under a fifth of 1000: the properties above test both
    // acceptance and refusal.
    let both_sides = 200..=800;
    for (what, count) in [
        (
            "PlaceOrder",
            accepted(place_order_request(), check_place_order),
        ),
        ("Reserve", accepted(reserve_request(), check_reserve)),
        ("Charge", accepted(charge_request(), check_charge)),
        ("Ship", accepted(ship_request(), check_ship)),
        (
            "traceparent",
            accepted(traceparent(), |h| check_traceparent(&h)),
        ),
    ] {
        eprintln!("{what}: {count} of 1000 accepted");
        assert!(
            both_sides.contains(&count),
            "{what}: {count} of 1000 accepted"
        );
    }
}

fn order(quantity: i32, key: &str) -> saga::PlaceOrderRequest {
    harness::place_request("c1", &[("p1", quantity)], key)
}

#[test]
fn the_check_catches_wrong_answers() {
    type Validate = fn(saga::PlaceOrderRequest) -> Result<ValidOrder, Status>;
    let right: Validate = |r| validate_place_order(r).map_err(Status::from);
    let wrong: [(&str, Validate, saga::PlaceOrderRequest); 5] = [
        (
            "accepts anything",
            |r| {
                Ok(ValidOrder {
                    customer_id: r.customer_id,
                    items: Vec::new(),
                    idempotency_key: None,
                })
            },
            order(0, ""),
        ),
        (
            "refuses the largest quantity",
            |r| match r.items.first() {
                Some(item) if item.quantity == 10_000 => Err(Status::invalid_argument("too many")),
                _ => validate_place_order(r).map_err(Status::from),
            },
            order(10_000, ""),
        ),
        (
            "drops the key",
            |r| {
                validate_place_order(r)
                    .map(|order| ValidOrder {
                        idempotency_key: None,
                        ..order
                    })
                    .map_err(Status::from)
            },
            order(1, "k1"),
        ),
        (
            "reorders the items",
            |r| {
                validate_place_order(r)
                    .map(|mut order| {
                        order.items.reverse();
                        order
                    })
                    .map_err(Status::from)
            },
            harness::place_request("c1", &[("p1", 1), ("p2", 2)], ""),
        ),
        (
            "refuses with the wrong code",
            |r| validate_place_order(r).map_err(|e| Status::internal(e.to_string())),
            order(10_001, ""),
        ),
    ];
    for (what, validate, request) in wrong {
        assert!(
            check_place_order_with(request.clone(), right).is_ok(),
            "{what}: the right validation fails the check on {request:?}"
        );
        assert!(
            check_place_order_with(request.clone(), validate).is_err(),
            "the check passes a validation that {what}, on {request:?}"
        );
    }
}

/// The seed corpus the fuzz targets start from (`fuzz/seeds/<target>/`).
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn the_fuzz_targets_hold_on_their_seeds() {
    type Target = fn(&[u8]);
    let targets: [(&str, Target); 5] = [
        ("place_order", harness::fuzz::place_order),
        ("reserve", harness::fuzz::reserve),
        ("charge", harness::fuzz::charge),
        ("ship", harness::fuzz::ship),
        ("saga_machine", harness::fuzz::saga_machine),
    ];
    for (target, run) in targets {
        let seeds = seeds(target);
        assert!(seeds.len() >= 2, "{target}: {} seeds", seeds.len());
        for (_, data) in &seeds {
            run(data);
        }
    }
    // The request seeds are messages the servers decode, on both sides of
    // the contract.
    use prost::Message;
    let verdicts = |target: &str, check: &dyn Fn(&[u8]) -> Result<bool, String>| {
        seeds(target)
            .into_iter()
            .map(|(name, data)| (name, check(&data).unwrap()))
            .collect::<Vec<_>>()
    };
    let place = |data: &[u8]| {
        let (n, rest) = data.split_first().unwrap();
        check_traceparent(std::str::from_utf8(&rest[..usize::from(*n)]).unwrap())?;
        check_place_order(saga::PlaceOrderRequest::decode(&rest[usize::from(*n)..]).unwrap())
    };
    assert_eq!(
        verdicts("place_order", &place),
        [
            ("duplicate_product".to_owned(), false),
            ("one_item".to_owned(), true),
            ("with_key_and_trace".to_owned(), true),
            ("zero_quantity".to_owned(), false),
        ]
    );
    let reserve = |data: &[u8]| check_reserve(inventory::ReserveRequest::decode(data).unwrap());
    assert_eq!(
        verdicts("reserve", &reserve),
        [
            ("no_items".to_owned(), false),
            ("two_items".to_owned(), true)
        ]
    );
    let charge = |data: &[u8]| check_charge(payment::ChargeRequest::decode(data).unwrap());
    assert_eq!(
        verdicts("charge", &charge),
        [("negative".to_owned(), false), ("ok".to_owned(), true)]
    );
    let ship = |data: &[u8]| check_ship(fulfillment::ShipRequest::decode(data).unwrap());
    assert_eq!(
        verdicts("ship", &ship),
        [
            ("negative_quantity".to_owned(), false),
            ("two_items".to_owned(), true)
        ]
    );
}
