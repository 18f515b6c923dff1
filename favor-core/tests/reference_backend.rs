use favor_core::testing;
#[test]
fn smoke() { assert_eq!(testing::random_tensor(1, 3, 1.0).len(), 3); }
