/*
 * Ring-0 stub. Under kvm_pvm every ring-0 instruction is emulated (~1 µs each) and some
 * instructions kill the VM (SSE, int3, int imm8, popcnt, rdtscp, ...), so this file only
 * does what ring 3 cannot: enter long mode, load GDT/IDT/TSS, the int3 call gate, the
 * interrupt stubs (set a pending bit + EOI) and the fatal-exception printer.
 * Everything else, including filling the IDT, is done by the Rust code in ring 3.
 * Constants in braces are substituted from Rust (arch/mod.rs).
 */

.set KCODE,        0x08
.set KDATA,        0x10
.set KCODE32,      0x18
.set UDATA,        0x23
.set UCODE,        0x2b
.set TSS_SEL0,     0x30            /* CPU n uses TSS selector 0x30 + 16 * n */
.set MAX_CPUS,     {max_cpus}
.set PERCPU_SIZE,  {percpu_size}   /* per-CPU ring-0 area, aligned to its size */
.set PERCPU_TSS,   {percpu_tss}
.set TSS_LIMIT,    104 + 8192      /* TSS + I/O bitmap; byte 104+8192 is the 0xff terminator */
.set R3_STACK,     {r3_stack}
.set TRAMPOLINE,   {trampoline}
.set EVENT_BASE,   {event_base}    /* vectors EVENT_BASE.. set pending bit (v - EVENT_BASE) */
.set EVENT_COUNT,  {event_count}
.set LAPIC_EOI,    0xfee000b0
.set COM1,         0x3f8
.set GATE_CALLS,   3

/* ---- PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), read from PT_NOTE by the loader ---- */
.pushsection .note.Xen, "a", @note
.balign 4
.long 4, 8, 18
.asciz "Xen"
.balign 4
.quad pvh_entry
.popsection

/* ---- 32-bit PVH entry: ebx = hvm_start_info, paging off ---- */
.pushsection .text.boot, "ax"
.code32
.global pvh_entry
pvh_entry:
    cli
    cld
    mov %ebx, start_info_paddr
    rdtsc
    mov %eax, entry_tsc
    mov %edx, entry_tsc + 4
    lgdt gdt_ptr
    ljmp $KCODE32, $1f
1:  xor %edi, %edi                 /* edi = 0: this is the BSP */

/* Shared by the BSP and the APs (edi = 1): 32-bit protected mode -> long mode. */
long_path32:
    mov $KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov %cr4, %eax
    or $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $0x9fffffff, %eax          /* caches on (clear CD, NW) */
    or $0x80000023, %eax           /* PG | NE | MP | PE */
    mov %eax, %cr0
    ljmp $KCODE, $long_entry

/* AP real-mode trampoline: copied to TRAMPOLINE by ring 3, started by SIPI (CS = TRAMPOLINE >> 4). */
.code16
.global ap_trampoline_start
ap_trampoline_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl TRAMPOLINE + (ap_gdt_ptr - ap_trampoline_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $KCODE32, $ap_entry32
.balign 8
ap_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
.global ap_trampoline_end
ap_trampoline_end:

.code32
ap_entry32:
    mov $1, %edi
    jmp long_path32

.code64
long_entry:
    test %edi, %edi
    jnz 1f
    xor %ecx, %ecx                 /* BSP is CPU 0 */
    jmp 2f
1:  mov $1, %ecx                   /* APs take the next index in arrival order */
    lock xadd %ecx, next_cpu(%rip)
    cmp $MAX_CPUS, %ecx
    jae park
2:  mov %ecx, %ebx
    shl $14, %rbx                  /* PERCPU_SIZE = 1 << 14 (checked in Rust) */
    lea percpu(%rip), %rax
    add %rax, %rbx                 /* rbx = this CPU's ring-0 area */
    lea PERCPU_SIZE(%rbx), %rsp
    mov %rcx, 8(%rbx)
    lea PERCPU_TSS(%rbx), %rdx
    mov %rsp, 4(%rdx)              /* TSS.RSP0 */
    movw $104, 102(%rdx)           /* I/O bitmap right after the TSS, all zero = all ports */
    movb $0xff, 104 + 8192(%rdx)
    /* 64-bit TSS descriptor for base edx (below 4 GiB, so the upper half is 0) */
    mov %edx, %eax
    and $0xffffff, %eax
    shl $16, %rax
    mov %edx, %r8d
    and $0xff000000, %r8d
    shl $32, %r8
    or %r8, %rax
    or $TSS_LIMIT, %rax
    movabs $0x0000890000000000, %r8
    or %r8, %rax
    mov %ecx, %r9d
    shl $4, %r9d
    lea gdt + TSS_SEL0(%rip), %rsi
    mov %rax, (%rsi, %r9)
    movq $0, 8(%rsi, %r9)
    lea TSS_SEL0(%r9), %eax
    ltr %ax
    lidt idt_ptr(%rip)
    /* iretq to ring 3 on this CPU's ring-3 stack, rdi = cpu index, rsi = start_info */
    lea 1(%rcx), %eax
    shl $18, %rax                  /* R3_STACK = 1 << 18 (checked in Rust) */
    lea r3_stacks(%rip), %r8
    add %r8, %rax
    push $UDATA
    push %rax
    push $0x202                    /* IF = 1 */
    push $UCODE
    lea ring3_start(%rip), %rax
    push %rax
    mov %ecx, %edi
    mov start_info_paddr(%rip), %esi
    iretq

park:                              /* more CPUs than MAX_CPUS: stay parked forever */
    cli
    hlt
    jmp park

/* ---- int3 call gate (vector 3, DPL 3): rax = call, rdi/rsi/rdx = args, rax = result ---- */
.global gate_entry
gate_entry:
    cmp $GATE_CALLS, %rax
    jae 1f
    jmp *gate_table(, %rax, 8)
1:  mov $-1, %rax
    iretq

/* 0: sleep until the next interrupt unless one is already pending for this CPU */
call_halt:
    mov %rsp, %rax
    and $-PERCPU_SIZE, %rax
    cmpq $0, (%rax)
    jne 1f
    sti
    hlt
    cli
1:  xor %eax, %eax
    iretq

/* 1: triple fault: no IDT, then fault */
call_crash:
    lidt null_idt_ptr(%rip)
    ud2

/* 2: rep outsb: rdi = port, rsi = buffer, rdx = length */
call_outsb:
    mov %rdx, %rcx
    mov %edi, %edx
    rep outsb
    xor %eax, %eax
    iretq

/* ---- exception stubs 0..31: push (error, vector), print, triple fault ---- */
.pushsection .rodata.exc_stubs, "a"
.balign 8
.global exc_stubs
exc_stubs:
.popsection
.set v, 0
.rept 32
1:
.if (v == 8) || ((v >= 10) && (v <= 14)) || (v == 17) || (v == 21) || (v == 29) || (v == 30)
.else
    push $0
.endif
    push $v
    jmp fatal
.pushsection .rodata.exc_stubs, "a"
    .quad 1b
.popsection
.set v, v + 1
.endr

/* ---- event stubs: set pending bit in the per-CPU area, EOI, return ---- */
.pushsection .rodata.event_stubs, "a"
.balign 8
.global event_stubs
event_stubs:
.popsection
.set v, 0
.rept EVENT_COUNT
1:  push %rax
    mov %rsp, %rax
    and $-PERCPU_SIZE, %rax
    btsq $v, (%rax)
    mov $LAPIC_EOI, %eax
    movl $0, (%rax)
    pop %rax
    iretq
.pushsection .rodata.event_stubs, "a"
    .quad 1b
.popsection
.set v, v + 1
.endr

.global spurious_entry
spurious_entry:                    /* LAPIC spurious vector: no EOI */
    iretq

/* Prints "EXCEPTION vector=<n> rip=<hex> error=<hex>" and triple faults.
 * Stack: vector, error, rip, cs, rflags, rsp, ss. Slow (emulated), but only on the way down. */
fatal:
    mov $COM1, %edx
    lea msg_vector(%rip), %rsi
    mov $17, %ecx
    rep outsb
    mov (%rsp), %rax
    call put_dec
    lea msg_rip(%rip), %rsi
    mov $5, %ecx
    rep outsb
    mov 16(%rsp), %rax
    call put_hex
    lea msg_error(%rip), %rsi
    mov $7, %ecx
    rep outsb
    mov 8(%rsp), %rax
    call put_hex
    mov $10, %al
    out %al, %dx
    jmp call_crash

/* rax (< 1000) in decimal to port dx */
put_dec:
    mov %eax, %r8d
    mov $100, %r10d
    xor %r9d, %r9d
1:  mov %r8d, %eax
    push %rdx
    xor %edx, %edx
    div %r10d
    mov %edx, %r8d
    pop %rdx
    or %eax, %r9d
    cmp $1, %r10d
    je 2f
    test %r9d, %r9d
    jz 3f
2:  add $0x30, %eax
    out %al, %dx
3:  mov %r10d, %eax
    push %rdx
    xor %edx, %edx
    mov $10, %ecx
    div %ecx
    pop %rdx
    mov %eax, %r10d
    test %r10d, %r10d
    jnz 1b
    ret

/* rax in hex without leading zeros to port dx */
put_hex:
    mov %rax, %r8
    mov $60, %ecx
    xor %r9d, %r9d
1:  mov %r8, %rax
    shr %cl, %rax
    and $0xf, %eax
    or %eax, %r9d
    test %ecx, %ecx
    jz 2f
    test %r9d, %r9d
    jz 3f
2:  cmp $10, %eax
    jb 4f
    add $0x27, %eax                /* 'a' - '0' - 10 */
4:  add $0x30, %eax
    out %al, %dx
3:  sub $4, %ecx
    jns 1b
    ret

/* ---- ring 3: first code after iretq; Rust never returns ---- */
ring3_start:
    call rust_entry
    ud2
.popsection

.pushsection .rodata.boot, "a"
.balign 8
gate_table:
    .quad call_halt, call_crash, call_outsb
msg_vector: .ascii "EXCEPTION vector="
msg_rip:    .ascii " rip="
msg_error:  .ascii " error="
.popsection

.pushsection .data.boot, "aw"
.balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff       /* 0x08 ring-0 code, 64-bit */
    .quad 0x00cf92000000ffff       /* 0x10 ring-0 data */
    .quad 0x00cf9a000000ffff       /* 0x18 ring-0 code, 32-bit (boot and AP paths) */
    .quad 0x00cff2000000ffff       /* 0x20 ring-3 data */
    .quad 0x00affa000000ffff       /* 0x28 ring-3 code, 64-bit */
    .fill MAX_CPUS * 2, 8, 0       /* 0x30.. TSS descriptors, written by long_entry */
gdt_end:
.balign 8
gdt_ptr:                           /* also read by the 32-bit lgdt (low 4 bytes of base) */
    .word gdt_end - gdt - 1
    .quad gdt
.balign 8
idt_ptr:
    .word 4095
    .quad idt
.balign 8
null_idt_ptr:
    .word 0
    .quad 0
.balign 8
.global entry_tsc
entry_tsc:  .quad 0
start_info_paddr: .quad 0
next_cpu:  .long 1

/* Identity map of the first 4 GiB with 2 MiB pages, all U/S=1 so ring 3 can touch
 * everything; 3-4 GiB (MMIO) is uncached (PCD). Static so ring 0 never builds tables. */
.balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7, pd + 0x1007, pd + 0x2007, pd + 0x3007
    .fill 508, 8, 0
pd:
.set i, 0
.rept 1536
    .quad (i << 21) | 0x87
.set i, i + 1
.endr
.rept 512
    .quad (i << 21) | 0x97
.set i, i + 1
.endr
.popsection

.pushsection .bss.boot, "aw", @nobits
.balign PERCPU_SIZE
.global percpu
percpu:    .skip MAX_CPUS * PERCPU_SIZE
.balign 4096
.global idt
idt:       .skip 4096
.balign 4096
r3_stacks: .skip MAX_CPUS * R3_STACK
.popsection
