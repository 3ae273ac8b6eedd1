//! Locks that outlive a panicking holder.
//!
//! Every `std::sync::Mutex` in mainstay guards data that one assignment or
//! one small update replaces (an interest, a list of peers, a pool of
//! buffers, a slot, a log of acknowledgements): a holder that panics halfway
//! leaves it as consistent as before, so poison tells us nothing about the
//! data. Passing the poison on would turn one bug into a cascade: a
//! panicking REST handler would take the HA loop with it, and an agent whose
//! tasks die stops renewing its lease, fencing and serving. So callers take
//! the data over; the panic itself is reported where it happened. A lock
//! whose holder could leave an invariant half-built must not use this.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the data over if an earlier holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_holder_leaves_the_data_usable() {
        let m = Mutex::new(vec![1]);
        let panicked = std::thread::scope(|s| {
            s.spawn(|| {
                lock(&m).push(2);
                let _held = lock(&m);
                panic!("the holder panics");
            })
            .join()
        });
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        lock(&m).push(3);
        assert_eq!(*lock(&m), [1, 2, 3]);
    }
}
