package appkernel

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"runtime"

	"github.com/containerd/errdefs"
)

// gVisor starts a sandbox with a root container and ends the sandbox when
// that container's init exits. kuasar-gvisor's root container is not a
// pause image: it runs idle, a tiny static program written here, as the
// init of the sandbox's root PID namespace. It never runs on the node: the
// sentry executes it. It blocks in rt_sigsuspend, waking on SIGCHLD to reap
// the orphans of a pod that shares its PID namespace, and does nothing
// else.
//
// The machine code (x86-64, Linux system call ABI):
//
//	_start:  lea rsi, [rip+act]        ; rt_sigaction(SIGCHLD, &act, NULL, 8)
//	         mov edi, 17
//	         xor edx, edx
//	         mov r10d, 8
//	         mov eax, 13
//	         syscall
//	         lea rsi, [rip+chld]       ; rt_sigprocmask(SIG_BLOCK, &chld, NULL, 8)
//	         xor edi, edi
//	         xor edx, edx
//	         mov r10d, 8
//	         mov eax, 14
//	         syscall
//	reap:    mov rdi, -1               ; wait4(-1, NULL, WNOHANG, NULL)
//	         xor esi, esi
//	         mov edx, 1
//	         xor r10d, r10d
//	         mov eax, 61
//	         syscall
//	         test rax, rax
//	         jg reap                   ; reaped one: look for another
//	         lea rdi, [rip+empty]      ; rt_sigsuspend(&empty, 8): unblock SIGCHLD and sleep
//	         mov esi, 8
//	         mov eax, 130
//	         syscall
//	         jmp reap
//	handler: ret
//	restorer: mov eax, 15              ; rt_sigreturn
//	         syscall
//	         (padding to 8 bytes)
//	act:     .quad handler, SA_RESTORER, restorer, 0
//	chld:    .quad 1 << (SIGCHLD-1)
//	empty:   .quad 0
var idleCodeAMD64 = []byte{
	0x48, 0x8d, 0x35, 0x69, 0x00, 0x00, 0x00, // lea rsi, [rip+0x69]   (act)
	0xbf, 0x11, 0x00, 0x00, 0x00, // mov edi, 17
	0x31, 0xd2, // xor edx, edx
	0x41, 0xba, 0x08, 0x00, 0x00, 0x00, // mov r10d, 8
	0xb8, 0x0d, 0x00, 0x00, 0x00, // mov eax, 13
	0x0f, 0x05, // syscall
	0x48, 0x8d, 0x35, 0x6e, 0x00, 0x00, 0x00, // lea rsi, [rip+0x6e]   (chld)
	0x31, 0xff, // xor edi, edi
	0x31, 0xd2, // xor edx, edx
	0x41, 0xba, 0x08, 0x00, 0x00, 0x00, // mov r10d, 8
	0xb8, 0x0e, 0x00, 0x00, 0x00, // mov eax, 14
	0x0f, 0x05, // syscall
	0x48, 0xc7, 0xc7, 0xff, 0xff, 0xff, 0xff, // reap: mov rdi, -1
	0x31, 0xf6, // xor esi, esi
	0xba, 0x01, 0x00, 0x00, 0x00, // mov edx, 1
	0x45, 0x31, 0xd2, // xor r10d, r10d
	0xb8, 0x3d, 0x00, 0x00, 0x00, // mov eax, 61
	0x0f, 0x05, // syscall
	0x48, 0x85, 0xc0, // test rax, rax
	0x7f, 0xe3, // jg reap
	0x48, 0x8d, 0x3d, 0x41, 0x00, 0x00, 0x00, // lea rdi, [rip+0x41]   (empty)
	0xbe, 0x08, 0x00, 0x00, 0x00, // mov esi, 8
	0xb8, 0x82, 0x00, 0x00, 0x00, // mov eax, 130
	0x0f, 0x05, // syscall
	0xeb, 0xce, // jmp reap
	0xc3,                         // handler: ret
	0xb8, 0x0f, 0x00, 0x00, 0x00, // restorer: mov eax, 15
	0x0f, 0x05, // syscall
	0x0f, 0x1f, 0x00, // nop (padding)
}

// Offsets in idleCodeAMD64 the data refers to.
const (
	idleHandlerOff  = 0x65
	idleRestorerOff = 0x66
	saRestorer      = 0x04000000
	sigchldMask     = 1 << (17 - 1)
	// idleBase is where the program is loaded.
	idleBase = 0x400000
)

// idleProgram returns the executable for goarch.
func idleProgram(goarch string) ([]byte, error) {
	if goarch != "amd64" {
		return nil, fmt.Errorf("kuasar-gvisor's root container program exists for amd64 only, not %s: %w", goarch, errdefs.ErrNotImplemented)
	}
	var ehdr elf.Header64
	var phdr elf.Prog64
	hdrSize := binary.Size(ehdr) + binary.Size(phdr)
	codeAt := uint64(idleBase + hdrSize)
	var data bytes.Buffer
	for _, v := range []uint64{
		codeAt + idleHandlerOff, saRestorer, codeAt + idleRestorerOff, 0, // act
		sigchldMask, // chld
		0,           // empty
	} {
		_ = binary.Write(&data, binary.LittleEndian, v)
	}
	size := uint64(hdrSize + len(idleCodeAMD64) + data.Len())

	copy(ehdr.Ident[:], elf.ELFMAG)
	ehdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	ehdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	ehdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	ehdr.Ident[elf.EI_OSABI] = byte(elf.ELFOSABI_NONE)
	ehdr.Type = uint16(elf.ET_EXEC)
	ehdr.Machine = uint16(elf.EM_X86_64)
	ehdr.Version = uint32(elf.EV_CURRENT)
	ehdr.Entry = codeAt
	ehdr.Phoff = uint64(binary.Size(ehdr))
	ehdr.Ehsize = uint16(binary.Size(ehdr))
	ehdr.Phentsize = uint16(binary.Size(phdr))
	ehdr.Phnum = 1
	phdr = elf.Prog64{
		Type:   uint32(elf.PT_LOAD),
		Flags:  uint32(elf.PF_R | elf.PF_X),
		Vaddr:  idleBase,
		Paddr:  idleBase,
		Filesz: size,
		Memsz:  size,
		Align:  0x1000,
	}
	var out bytes.Buffer
	_ = binary.Write(&out, binary.LittleEndian, &ehdr)
	_ = binary.Write(&out, binary.LittleEndian, &phdr)
	out.Write(idleCodeAMD64)
	out.Write(data.Bytes())
	return out.Bytes(), nil
}

// idleForHost is the root container program for this host.
func idleForHost() ([]byte, error) { return idleProgram(runtime.GOARCH) }
