//! Host tensor views report bad indices and ranges as values, never a panic.

use favor_core::{DType, FavorError, HostTensor, TensorHandle};

#[test]
fn out_of_range_reads_and_writes_are_errors_on_every_dtype() {
    for dtype in DType::ALL {
        let mut t = HostTensor::from_f32(dtype, &[1.0, 2.0, 3.0]);
        let v = t.view();
        assert_eq!(v.get(2), Some(3.0));
        assert_eq!(v.get(3), None, "{dtype}");
        assert_eq!(v.get(usize::MAX), None);

        let mut dst = [0.0f32; 2];
        assert_eq!(v.read_f32(1, &mut dst), Ok(()));
        assert_eq!(dst, [2.0, 3.0]);
        let mut dst = [7.0f32; 2];
        assert_eq!(v.read_f32(2, &mut dst), Err(FavorError::OutOfRange { start: 2, count: 2, len: 3 }));
        // start + count wraps: still an error, not a panic.
        assert_eq!(
            v.read_f32(usize::MAX, &mut dst),
            Err(FavorError::OutOfRange { start: usize::MAX, count: 2, len: 3 })
        );
        assert_eq!(dst, [7.0; 2], "untouched on error");

        let mut w = t.view_mut();
        assert_eq!(w.write_f32(3, &[1.0]), Err(FavorError::OutOfRange { start: 3, count: 1, len: 3 }));
        assert_eq!(
            w.write_f32(usize::MAX, &[1.0]),
            Err(FavorError::OutOfRange { start: usize::MAX, count: 1, len: 3 })
        );
        assert_eq!(w.write_f64(2, &[1.0, 1.0]), Err(FavorError::OutOfRange { start: 2, count: 2, len: 3 }));
        assert_eq!(w.write_f32(0, &[4.0]), Ok(()));
        assert_eq!(w.write_f64(1, &[5.0, 6.0]), Ok(()));
        assert_eq!(w.len(), 3);
        assert_eq!(t.to_f32_vec(), vec![4.0, 5.0, 6.0], "{dtype}");
        assert_eq!(t.to_f64_vec(), vec![4.0, 5.0, 6.0]);
    }
}
