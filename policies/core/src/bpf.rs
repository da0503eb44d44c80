//! Reading classic BPF seccomp programs: a disassembler for auditors (`airlock policy bpf`) and
//! an evaluator that runs a program on a given `seccomp_data`, the way the kernel would.
//!
//! Both accept any seccomp program (ours or one read back from a live process), not just what
//! our compiler emits. The evaluator refuses what the kernel's seccomp checker refuses (jumps
//! out of range, loads outside `seccomp_data`, falling off the end).

use std::fmt::Write as _;

use seccompiler::sock_filter;

use crate::arch::Arch;
use crate::consts;
use crate::error::PolicyError;
use crate::syscalls;

/// Packs a program into one `u64` per instruction (`code | jt << 16 | jf << 24 | k << 32`),
/// the form a confinement plan carries it in.
pub fn pack_program(prog: &[sock_filter]) -> Vec<u64> {
    prog.iter()
        .map(|i| u64::from(i.code) | u64::from(i.jt) << 16 | u64::from(i.jf) << 24 | u64::from(i.k) << 32)
        .collect()
}

/// Unpacks a program packed by [`pack_program`].
pub fn unpack_program(packed: &[u64]) -> seccompiler::BpfProgram {
    packed
        .iter()
        .map(|&w| sock_filter { code: w as u16, jt: (w >> 16) as u8, jf: (w >> 24) as u8, k: (w >> 32) as u32 })
        .collect()
}

/// What the kernel hands a seccomp filter (`struct seccomp_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeccompData {
    pub nr: i32,
    pub arch: u32,
    pub instruction_pointer: u64,
    pub args: [u64; 6],
}

impl SeccompData {
    /// A call of syscall `nr` on `arch` with `args`.
    pub fn new(arch: Arch, nr: u32, args: [u64; 6]) -> SeccompData {
        SeccompData { nr: nr as i32, arch: arch.audit_arch(), instruction_pointer: 0, args }
    }

    fn word(&self, offset: u32) -> Option<u32> {
        match offset {
            0 => Some(self.nr as u32),
            4 => Some(self.arch),
            8 => Some(self.instruction_pointer as u32),
            12 => Some((self.instruction_pointer >> 32) as u32),
            16..=60 if offset.is_multiple_of(4) => {
                let i = ((offset - 16) / 8) as usize;
                let v = self.args[i];
                Some(if offset.is_multiple_of(8) { v as u32 } else { (v >> 32) as u32 })
            }
            _ => None,
        }
    }
}

// Instruction classes and fields, from <linux/bpf_common.h>.
const BPF_LD: u16 = 0x00;
const BPF_LDX: u16 = 0x01;
const BPF_ST: u16 = 0x02;
const BPF_STX: u16 = 0x03;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_MISC: u16 = 0x07;
const BPF_W: u16 = 0x00;
const BPF_IMM: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_MEM: u16 = 0x60;
const BPF_LEN: u16 = 0x80;
const BPF_K: u16 = 0x00;
const BPF_X: u16 = 0x08;
const BPF_A: u16 = 0x10;

fn class(code: u16) -> u16 {
    code & 0x07
}

/// The name of a filter return value: `ALLOW`, `ERRNO(38 ENOSYS)`, `KILL_PROCESS`, ...
pub fn action_name(ret: u32) -> String {
    let data = ret & 0xffff;
    match ret & 0xffff_0000 {
        0x8000_0000 => "KILL_PROCESS".into(),
        0x0000_0000 => "KILL_THREAD".into(),
        0x0003_0000 => "TRAP".into(),
        0x0005_0000 => match consts::errno_name(data) {
            Some(n) => format!("ERRNO({data} {n})"),
            None => format!("ERRNO({data})"),
        },
        0x7fc0_0000 => "USER_NOTIF".into(),
        0x7ff0_0000 => format!("TRACE({data})"),
        0x7ffc_0000 => "LOG".into(),
        0x7fff_0000 => "ALLOW".into(),
        _ => format!("UNKNOWN({ret:#x})"),
    }
}

fn field_name(k: u32) -> String {
    match k {
        0 => "nr".into(),
        4 => "arch".into(),
        8 => "ip.lo".into(),
        12 => "ip.hi".into(),
        16..=60 if k.is_multiple_of(4) => {
            let i = (k - 16) / 8;
            if k.is_multiple_of(8) {
                format!("args[{i}].lo")
            } else {
                format!("args[{i}].hi")
            }
        }
        _ => format!("?{k}"),
    }
}

/// What the accumulator holds on entry to each instruction, over every path that reaches it:
/// `Some(Some(k))` the word at offset `k` of `seccomp_data`, `Some(None)` something else or a
/// mix, `None` unreachable. Classic BPF only jumps forward, so one pass in order suffices.
fn accumulator_sources(prog: &[sock_filter]) -> Vec<Option<Option<u32>>> {
    let mut state: Vec<Option<Option<u32>>> = vec![None; prog.len()];
    if let Some(first) = state.first_mut() {
        *first = Some(None);
    }
    let join = |state: &mut Vec<Option<Option<u32>>>, to: usize, v: Option<u32>| {
        if let Some(slot) = state.get_mut(to) {
            *slot = match *slot {
                None => Some(v),
                Some(old) if old == v => Some(old),
                Some(_) => Some(None),
            };
        }
    };
    for (pc, ins) in prog.iter().enumerate() {
        let Some(a) = state[pc] else { continue };
        let code = ins.code;
        let out = match class(code) {
            BPF_LD if code & 0xe0 == BPF_ABS => Some(ins.k),
            BPF_LD | BPF_ALU => None,
            BPF_MISC if code & 0xf8 != 0x00 => None,
            _ => a,
        };
        match class(code) {
            BPF_RET => {}
            BPF_JMP if code & 0xf0 == 0x00 => join(&mut state, pc + 1 + ins.k as usize, out),
            BPF_JMP => {
                join(&mut state, pc + 1 + usize::from(ins.jt), out);
                join(&mut state, pc + 1 + usize::from(ins.jf), out);
            }
            _ => join(&mut state, pc + 1, out),
        }
    }
    state
}

/// One instruction a line: `0004: jeq  #0x3b        jt 0005  jf 0007   ; execve`.
/// With `arch`, comparisons of the syscall number are annotated with the syscall's name (where
/// every path to the comparison loaded the number).
pub fn disassemble(prog: &[sock_filter], arch: Option<Arch>) -> String {
    let mut out = String::new();
    let sources = accumulator_sources(prog);
    for (pc, ins) in prog.iter().enumerate() {
        let a_is_nr = sources[pc] == Some(Some(0));
        let code = ins.code;
        let k = ins.k;
        let target = |off: u32| pc as u64 + 1 + u64::from(off);
        let (text, note) = match class(code) {
            BPF_LD => {
                let mode = code & 0xe0;
                match mode {
                    BPF_ABS => (format!("ld   [{k}]"), format!("A = {}", field_name(k))),
                    BPF_IMM => (format!("ld   #{k:#x}"), String::new()),
                    BPF_MEM => (format!("ld   M[{k}]"), String::new()),
                    BPF_LEN => ("ld   #len".to_string(), "A = sizeof(seccomp_data)".into()),
                    _ => (format!("ld?  code={code:#06x} k={k:#x}"), String::new()),
                }
            }
            BPF_LDX => match code & 0xe0 {
                BPF_IMM => (format!("ldx  #{k:#x}"), String::new()),
                BPF_MEM => (format!("ldx  M[{k}]"), String::new()),
                BPF_LEN => ("ldx  #len".to_string(), String::new()),
                _ => (format!("ldx? code={code:#06x} k={k:#x}"), String::new()),
            },
            BPF_ST => (format!("st   M[{k}]"), String::new()),
            BPF_STX => (format!("stx  M[{k}]"), String::new()),
            BPF_ALU => {
                let op = match code & 0xf0 {
                    0x00 => "add",
                    0x10 => "sub",
                    0x20 => "mul",
                    0x30 => "div",
                    0x40 => "or",
                    0x50 => "and",
                    0x60 => "lsh",
                    0x70 => "rsh",
                    0x80 => "neg",
                    0x90 => "mod",
                    0xa0 => "xor",
                    _ => "alu?",
                };
                if code & 0xf0 == 0x80 {
                    ("neg".to_string(), String::new())
                } else if code & BPF_X != 0 {
                    (format!("{op:<4} x"), String::new())
                } else {
                    (format!("{op:<4} #{k:#x}"), String::new())
                }
            }
            BPF_JMP => {
                let op = code & 0xf0;
                if op == 0x00 {
                    (format!("ja   {:04}", target(k)), String::new())
                } else {
                    let name = match op {
                        0x10 => "jeq",
                        0x20 => "jgt",
                        0x30 => "jge",
                        0x40 => "jset",
                        _ => "j?",
                    };
                    let operand = if code & BPF_X != 0 { "x".to_string() } else { format!("#{k:#x}") };
                    let mut note = String::new();
                    if a_is_nr && op == 0x10 && code & BPF_X == 0 {
                        if let Some(a) = arch {
                            note = syscalls::name(a, k).unwrap_or("unknown syscall").to_string();
                        }
                    } else if op == 0x10 && code & BPF_X == 0 && sources[pc] == Some(Some(4)) {
                        if let Some(a) = Arch::from_audit_arch(k) {
                            note = format!("AUDIT_ARCH_{}", a.name().to_uppercase());
                        }
                    }
                    (
                        format!(
                            "{name:<4} {operand:<12} jt {:04}  jf {:04}",
                            target(u32::from(ins.jt)),
                            target(u32::from(ins.jf))
                        ),
                        note,
                    )
                }
            }
            BPF_RET => {
                if code & 0x18 == BPF_A {
                    ("ret  A".to_string(), String::new())
                } else {
                    (format!("ret  {}", action_name(k)), String::new())
                }
            }
            _ => {
                let op = if code & 0xf8 == 0x00 { "tax" } else { "txa" };
                (op.to_string(), String::new())
            }
        };
        if note.is_empty() {
            let _ = writeln!(out, "{pc:04}: {text}");
        } else {
            let _ = writeln!(out, "{pc:04}: {text:<40} ; {note}");
        }
    }
    out
}

/// Runs `prog` on `data` and returns the filter's return value (`SECCOMP_RET_*`).
pub fn evaluate(prog: &[sock_filter], data: &SeccompData) -> Result<u32, PolicyError> {
    let err = |pc: usize, reason: &str| PolicyError::EvaluateBpf { pc, reason: reason.to_string() };
    let mut a: u32 = 0;
    let mut x: u32 = 0;
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    // A classic BPF program only jumps forward, so it ends within `prog.len()` steps.
    for _ in 0..=prog.len() {
        let Some(ins) = prog.get(pc) else { return Err(err(pc, "fell off the end of the program")) };
        let k = ins.k;
        let code = ins.code;
        let mut next = pc + 1;
        match class(code) {
            BPF_LD => {
                a = match code & 0xe0 {
                    BPF_ABS if code & 0x18 == BPF_W => {
                        data.word(k).ok_or_else(|| err(pc, "load outside seccomp_data"))?
                    }
                    BPF_IMM => k,
                    BPF_MEM => *mem.get(k as usize).ok_or_else(|| err(pc, "scratch index out of range"))?,
                    BPF_LEN => 64,
                    _ => return Err(err(pc, "unsupported load")),
                }
            }
            BPF_LDX => {
                x = match code & 0xe0 {
                    BPF_IMM => k,
                    BPF_MEM => *mem.get(k as usize).ok_or_else(|| err(pc, "scratch index out of range"))?,
                    BPF_LEN => 64,
                    _ => return Err(err(pc, "unsupported load")),
                }
            }
            BPF_ST => *mem.get_mut(k as usize).ok_or_else(|| err(pc, "scratch index out of range"))? = a,
            BPF_STX => *mem.get_mut(k as usize).ok_or_else(|| err(pc, "scratch index out of range"))? = x,
            BPF_ALU => {
                let src = if code & BPF_X != 0 { x } else { k };
                a = match code & 0xf0 {
                    0x00 => a.wrapping_add(src),
                    0x10 => a.wrapping_sub(src),
                    0x20 => a.wrapping_mul(src),
                    0x30 => a.checked_div(src).ok_or_else(|| err(pc, "division by zero"))?,
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a.checked_shl(src).unwrap_or(0),
                    0x70 => a.checked_shr(src).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 => a.checked_rem(src).ok_or_else(|| err(pc, "division by zero"))?,
                    0xa0 => a ^ src,
                    _ => return Err(err(pc, "unsupported ALU operation")),
                }
            }
            BPF_JMP => {
                let src = if code & BPF_X != 0 { x } else { k };
                let (op, jt, jf) = (code & 0xf0, usize::from(ins.jt), usize::from(ins.jf));
                next = match op {
                    0x00 => pc + 1 + k as usize,
                    0x10 => pc + 1 + if a == src { jt } else { jf },
                    0x20 => pc + 1 + if a > src { jt } else { jf },
                    0x30 => pc + 1 + if a >= src { jt } else { jf },
                    0x40 => pc + 1 + if a & src != 0 { jt } else { jf },
                    _ => return Err(err(pc, "unsupported jump")),
                };
                if next >= prog.len() {
                    return Err(err(pc, "jump out of the program"));
                }
            }
            BPF_RET => {
                return Ok(match code & 0x18 {
                    BPF_K => k,
                    BPF_A => a,
                    _ => return Err(err(pc, "unsupported return")),
                })
            }
            BPF_MISC => {
                if code & 0xf8 == 0x00 {
                    x = a
                } else {
                    a = x
                }
            }
            _ => return Err(err(pc, "unknown instruction class")),
        }
        pc = next;
    }
    Err(err(pc, "program does not terminate"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ins(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
        sock_filter { code, jt, jf, k }
    }

    #[test]
    fn evaluates_loads_jumps_and_masks() {
        // if (args[2].lo & 4) return ERRNO(1); if nr == 9 return ALLOW; return KILL
        let prog = [
            ins(0x20, 0, 0, 32),
            ins(0x45, 0, 1, 4),
            ins(0x06, 0, 0, 0x0005_0001),
            ins(0x20, 0, 0, 0),
            ins(0x15, 0, 1, 9),
            ins(0x06, 0, 0, 0x7fff_0000),
            ins(0x06, 0, 0, 0x8000_0000),
        ];
        let d = |nr: u32, prot: u64| SeccompData::new(Arch::X86_64, nr, [0, 0, prot, 0, 0, 0]);
        assert_eq!(evaluate(&prog, &d(9, 3)).expect("eval"), 0x7fff_0000);
        assert_eq!(evaluate(&prog, &d(9, 7)).expect("eval"), 0x0005_0001);
        assert_eq!(evaluate(&prog, &d(10, 3)).expect("eval"), 0x8000_0000);
        let text = disassemble(&prog, Some(Arch::X86_64));
        assert!(text.contains("0004: jeq  #0x9") && text.contains("; mmap"), "{text}");
        assert!(text.contains("jset #0x4"), "{text}");
        assert!(text.contains("0006: ret  KILL_PROCESS"), "{text}");
    }

    #[test]
    fn refuses_what_the_kernel_refuses() {
        let d = SeccompData::new(Arch::X86_64, 0, [0; 6]);
        assert!(evaluate(&[ins(0x15, 5, 5, 0)], &d).is_err(), "jump out of the program");
        assert!(evaluate(&[ins(0x20, 0, 0, 0)], &d).is_err(), "falls off the end");
        assert!(evaluate(&[ins(0x20, 0, 0, 64), ins(0x06, 0, 0, 0)], &d).is_err(), "load out of range");
    }

    #[test]
    fn names_every_action() {
        assert_eq!(action_name(0x7fff_0000), "ALLOW");
        assert_eq!(action_name(0x0005_0026), "ERRNO(38 ENOSYS)");
        assert_eq!(action_name(0x0003_0000), "TRAP");
        assert_eq!(action_name(0), "KILL_THREAD");
        assert_eq!(action_name(0x8000_0000), "KILL_PROCESS");
        assert_eq!(action_name(0x7ffc_0000), "LOG");
    }
}
