//! The mem* symbols compiler_builtins does not provide for the *-linux-gnu target.
//! Written with string instructions in asm so LLVM cannot turn them back into calls.

use core::arch::asm;

/// C `memcpy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// C `memmove` (copies backwards when the destination overlaps the source's tail).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: dst is below src or past its end, so a forward copy is safe.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: overlapping with dst above src: copy from the last byte down, then restore DF.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n).wrapping_sub(1) => _,
             inout("rsi") src.add(n).wrapping_sub(1) => _,
             inout("rcx") n => _, options(nostack));
    }
    dst
}

/// C `memset`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees dst..dst+n is writable.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// C `memcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let left: usize;
    // SAFETY: the caller guarantees both ranges are readable; repe cmpsb stops after the
    // first differing byte with rsi/rdi one past it.
    unsafe {
        asm!("repe cmpsb", inout("rsi") a => _, inout("rdi") b => _, inout("rcx") n => left,
             options(nostack, readonly));
    }
    // Re-read the last compared pair: equal means the whole range matched.
    let i = n - left - 1;
    // SAFETY: i < n.
    let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
    x as i32 - y as i32
}

/// C `bcmp` (zero iff equal).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by a landing pad in the precompiled `alloc` that LTO cannot prove dead (it
/// came with smoltcp's use of `alloc`). With `panic = "abort"` no unwinding ever starts,
/// so this is never called.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    super::crash()
}
