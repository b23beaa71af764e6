/*
 * Ring transitions for usermode.c: the IRETQ into ring 3 and the
 * exception entry stubs. See usermode.h.
 */
#define KERNEL_DS 0x10
#define USER_CS (0x18 | 3)
#define USER_DS (0x20 | 3)
/* RFLAGS: IF, and bit 1 which is always set (Intel SDM vol. 1, 3.4.3). */
#define USER_RFLAGS 0x202

    .text
/*
 * enter_user(fn = rdi, arg = rsi, stack_top = rdx): IRETQ to ring 3 at
 * user_entry, which calls fn(arg) and resets if fn returns.
 */
    .globl enter_user
    .type enter_user, @function
enter_user:
    movq    %rdi, %rax
    movq    %rsi, %rdi
    pushq   $USER_DS
    pushq   %rdx
    pushq   $USER_RFLAGS
    pushq   $USER_CS
    leaq    user_entry(%rip), %rcx
    pushq   %rcx
    iretq
    .size enter_user, . - enter_user

user_entry:
    movl    $USER_DS, %ecx
    movw    %cx, %ds
    movw    %cx, %es
    xorl    %ebp, %ebp
    call    *%rax
    call    reset

/*
 * Exception stubs, 16 bytes apart: vector i enters at
 * exception_stubs + 16 * i. Vectors without a CPU-pushed error code push
 * a zero so that usermode_exception() sees one frame layout:
 * vector, error code, RIP, CS, RFLAGS, RSP, SS.
 * Vectors with an error code: Intel SDM vol. 3A, table 6-1.
 */
    .globl exception_stubs
    .balign 16
exception_stubs:
    .set vec, 0
    .rept 48
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq   $0
    .endif
    pushq   $vec
    jmp     exception_common
    .set vec, vec + 1
    .endr

exception_common:
    movl    $KERNEL_DS, %eax
    movw    %ax, %ds
    movw    %ax, %es
    movq    %rsp, %rdi
    andq    $-16, %rsp
    call    usermode_exception
1:  hlt
    jmp     1b

    .section .note.GNU-stack, "", @progbits
