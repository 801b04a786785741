//! The AMX instructions of the bf16x3 product: turning the tile registers on for the process
//! and a thread, and the 32 x 32 block that sums one pair of bf16 operands into four tiles.
//!
//! Rust has no stable AMX intrinsics, so the instructions are inline assembly. The compiler
//! never uses the tile registers itself, so values left in `tmm0`-`tmm3` between two `asm!`
//! blocks of one thread stay there (the kernel saves them on a context switch, as it saves
//! the vector registers).

use std::arch::asm;
use std::cell::Cell;

/// Linux's `arch_prctl` request for permission to use an extended state component, and the
/// AMX tile data component (the registers; the configuration needs no permission).
const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
const XFEATURE_XTILEDATA: libc::c_long = 18;

/// Whether this CPU has AMX-BF16 and the kernel lets this process use the tile registers.
/// The first call asks the kernel (once for the whole process).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        let cpu = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
        // SAFETY: a plain system call with integer arguments; it fails cleanly (EINVAL,
        // EOPNOTSUPP) where the kernel or the hypervisor does not offer AMX.
        cpu && unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    })
}

/// Palette 1 with all eight tiles 16 rows of 64 bytes: an A tile is 16 rows of 32 bf16 (16
/// k-pairs), a B tile 16 k-pairs of 16 columns (each 2 bf16), a C tile 16 x 16 f32.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    const fn all_full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // colsb, little-endian u16
            c[48 + t] = 16; // rows
            t += 1;
        }
        Self(c)
    }
}

static CONFIG: Config = Config::all_full();

thread_local! {
    /// Set once this thread has loaded [`CONFIG`]: the configuration stays until a
    /// `tilerelease` (never issued), and no other code here loads another.
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
}

/// Loads the tile configuration on this thread, the first time.
///
/// SAFETY: [`available`] returned true.
pub unsafe fn configure_thread() {
    if !CONFIGURED.get() {
        asm!("ldtilecfg [{c}]", c = in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        CONFIGURED.set(true);
    }
}

/// The operands of a 32 x 32 output block, each a run of 1 KiB tiles one per block of 32 k:
/// `a_hi`/`a_lo` rows 0-15 (rows 16-31 are the run `a_next` bytes further), `b_hi`/`b_lo`
/// columns 0-15 (columns 16-31 `b_next` bytes further).
pub struct Operands {
    pub a_hi: *const u16,
    pub a_lo: *const u16,
    pub a_next: usize,
    pub b_hi: *const u16,
    pub b_lo: *const u16,
    pub b_next: usize,
}

/// Starts the four sums `tmm0`-`tmm3` (rows 0-15 / 16-31 by columns 0-15 / 16-31) at the 32
/// values at `bias` in every row (a tile load with a row stride of 0), or at zero.
///
/// SAFETY: [`configure_thread`] ran on this thread; `bias` holds 32 f32.
pub unsafe fn start_sums(bias: Option<*const f32>) {
    match bias {
        Some(b) => {
            let [o0, o1, o2, o3] = corners(b.cast_mut(), 0);
            asm!(
                "tileloadd tmm0, [{o0} + {z} * 1]",
                "tileloadd tmm1, [{o1} + {z} * 1]",
                "tileloadd tmm2, [{o2} + {z} * 1]",
                "tileloadd tmm3, [{o3} + {z} * 1]",
                o0 = in(reg) o0,
                o1 = in(reg) o1,
                o2 = in(reg) o2,
                o3 = in(reg) o3,
                z = in(reg) 0usize,
                options(nostack, readonly)
            )
        }
        None => asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        ),
    }
}

/// Adds lo·hi, hi·lo and hi·hi of `p` over `k_blocks` blocks of 32 to the four sums, in that
/// order within each block (the small terms first). A block reads ten tiles for twelve
/// products: the hi columns are read again after the lo ones, from L1.
///
/// SAFETY: [`configure_thread`] ran on this thread; each of `p`'s runs holds `k_blocks` tiles.
pub unsafe fn add_products(p: &Operands, k_blocks: usize) {
    for kb in 0..k_blocks {
        let at = kb * 1024;
        asm!(
            "tileloadd tmm4, [{alo} + {s} * 1]",
            "tileloadd tmm5, [{alo1} + {s} * 1]",
            "tileloadd tmm6, [{bhi} + {s} * 1]",
            "tileloadd tmm7, [{bhi1} + {s} * 1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm4, [{ahi} + {s} * 1]",
            "tileloadd tmm5, [{ahi1} + {s} * 1]",
            "tileloadd tmm6, [{blo} + {s} * 1]",
            "tileloadd tmm7, [{blo1} + {s} * 1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm6, [{bhi} + {s} * 1]",
            "tileloadd tmm7, [{bhi1} + {s} * 1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            alo = in(reg) p.a_lo.byte_add(at),
            ahi = in(reg) p.a_hi.byte_add(at),
            bhi = in(reg) p.b_hi.byte_add(at),
            blo = in(reg) p.b_lo.byte_add(at),
            alo1 = in(reg) p.a_lo.byte_add(at + p.a_next),
            ahi1 = in(reg) p.a_hi.byte_add(at + p.a_next),
            bhi1 = in(reg) p.b_hi.byte_add(at + p.b_next),
            blo1 = in(reg) p.b_lo.byte_add(at + p.b_next),
            s = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
}

/// Stores the four sums as a 32 x 32 block at `out`, rows `stride` bytes apart.
///
/// SAFETY: [`configure_thread`] ran on this thread; the block's 32 rows of 32 f32 at `out` are
/// the caller's to write.
pub unsafe fn store_sums(out: *mut f32, stride: usize) {
    let [o0, o1, o2, o3] = corners(out, stride);
    asm!(
        "tilestored [{o0} + {s} * 1], tmm0",
        "tilestored [{o1} + {s} * 1], tmm1",
        "tilestored [{o2} + {s} * 1], tmm2",
        "tilestored [{o3} + {s} * 1], tmm3",
        o0 = in(reg) o0,
        o1 = in(reg) o1,
        o2 = in(reg) o2,
        o3 = in(reg) o3,
        s = in(reg) stride,
        options(nostack)
    );
}

/// Where the four sums' tiles of a 32 x 32 block at `at` (rows `stride` bytes apart) begin:
/// rows 0-15 and 16-31, each at columns 0 and 16, in `tmm0`-`tmm3` order.
fn corners(at: *mut f32, stride: usize) -> [*mut f32; 4] {
    let lower = at.wrapping_byte_add(16 * stride);
    [at, at.wrapping_add(16), lower, lower.wrapping_add(16)]
}
