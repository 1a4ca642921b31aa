// Package hypervisor is the boundary between the kuasar-vmm controller and
// the virtual machine monitors it can run: QEMU now (plugins/vmm/qemu),
// Cloud Hypervisor or Firecracker later. A driver never starts the VMM
// itself: the VMM must outlive the daemon, so the node's process keeper
// spawns it. A driver therefore works in three steps:
//
//  1. Prepare checks a Config, makes the VM's run directory and returns a
//     Launch (the argv and environment to spawn) and a State;
//  2. the controller spawns the Launch through the keeper, and records the
//     State (it is JSON) with the sandbox, with the pid if it knows it;
//  3. Attach connects to the running VMM from the State (by pid and
//     control socket), now or after a daemon restart, and returns a VM.
package hypervisor

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Hypervisor is a VMM driver.
type Hypervisor interface {
	// Name is the driver's name ("qemu"), recorded in State.
	Name() string
	// Prepare checks cfg, creates cfg.RunDir with what the VMM needs, and
	// returns how to start the VMM and the state to attach to it by.
	Prepare(ctx context.Context, cfg Config) (*Launch, State, error)
	// Attach connects to a VMM started from a Launch of Prepare (State.Pid
	// may be 0: the driver learns the pid from the VMM's pid file) or
	// recorded by an earlier daemon.
	Attach(ctx context.Context, st State) (VM, error)
}

// VM is a running VMM process.
type VM interface {
	// Pid is the VMM's process id.
	Pid() int
	// State is what a later daemon needs to attach again.
	State() State
	// DialAgent starts a session with the guest agent's channel: a
	// net.Conn for a ttrpc client. It waits for the agent until ctx ends.
	DialAgent(ctx context.Context) (net.Conn, error)
	// Stop ends the VMM: it asks it to quit, kills it when ctx is done,
	// and returns once the process is gone.
	Stop(ctx context.Context) error
	// Wait returns once the VMM process has exited, or ctx is done.
	Wait(ctx context.Context) error
	// Exited is closed when the VMM process has exited.
	Exited() <-chan struct{}
	// Console returns the end of the guest's console (at most n bytes,
	// kept bounded by the VMM: the guest writes it as it likes), or "".
	Console(ctx context.Context, n int) string
	// Close releases the driver's connections to the VMM, leaving it
	// running (a daemon that stops without stopping its pods).
	Close() error
	// Cleanup removes the run directory. The VMM must have exited.
	Cleanup() error
}

// NICAdder is a VM that takes network interfaces while it runs (QEMU:
// PCIe hotplug). A template clone gets its NIC this way, and so may a
// cold-booted VM, so that both take the same path.
type NICAdder interface {
	AddNIC(ctx context.Context, nic NIC) error
	RemoveNIC(ctx context.Context, id string) error
}

// Accel is how a VM's CPUs run.
type Accel string

// Accelerators. AccelAuto is a choice of the config, resolved by
// ResolveAccel before a Config reaches a driver.
const (
	AccelAuto Accel = "auto"
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg" // software emulation: slow, but runs anywhere
)

// KVMDevice is where KVM is.
const KVMDevice = "/dev/kvm"

// KVMUsable reports why KVM cannot run the guest, or nil. Having a
// /dev/kvm is not enough: some cloud VMs offer KVM without hardware
// virtualisation (kvm-pvm, which only runs guests whose kernel is built for
// it), so the CPU must also have VMX or SVM.
func KVMUsable() error {
	cpuinfo, _ := os.ReadFile("/proc/cpuinfo")
	_, pvm := os.Stat("/sys/module/kvm_pvm")
	return kvmUsable(KVMDevice, cpuinfo, pvm == nil)
}

func kvmUsable(dev string, cpuinfo []byte, pvm bool) error {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// KVM_GET_API_VERSION; 12 is the only stable API there has ever been.
	v, err := unix.IoctlRetInt(int(f.Fd()), 0xAE00)
	if err != nil {
		return fmt.Errorf("%s: KVM_GET_API_VERSION: %w", dev, err)
	}
	if v != 12 {
		return fmt.Errorf("%s: KVM API version %d, want 12", dev, v)
	}
	if !hasCPUFlag(cpuinfo, "vmx") && !hasCPUFlag(cpuinfo, "svm") {
		if pvm {
			return fmt.Errorf("%s is kvm-pvm (no VMX/SVM on this CPU): it runs only PVM-enabled guest kernels", dev)
		}
		return fmt.Errorf("%s is there but the CPU has no hardware virtualisation (VMX/SVM)", dev)
	}
	return nil
}

// hasCPUFlag reports whether the first CPU of /proc/cpuinfo has flag.
func hasCPUFlag(cpuinfo []byte, flag string) bool {
	for _, l := range strings.Split(string(cpuinfo), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.TrimSpace(k) == "flags" {
			for _, f := range strings.Fields(v) {
				if f == flag {
					return true
				}
			}
			return false
		}
	}
	return false
}

// ResolveAccel turns the configured accelerator ("auto", "kvm", "tcg" or
// empty for auto) into the one to use, given whether KVM is usable
// (kvmErr, as from KVMUsable). Asking for kvm where it is not usable is a
// FailedPrecondition naming the setting.
func ResolveAccel(want string, kvmErr error) (Accel, error) {
	switch Accel(strings.ToLower(strings.TrimSpace(want))) {
	case "", AccelAuto:
		if kvmErr == nil {
			return AccelKVM, nil
		}
		return AccelTCG, nil
	case AccelKVM:
		if kvmErr != nil {
			return "", fmt.Errorf("accel = \"kvm\" but KVM is not usable (%v): enable KVM on the node or set accel = \"auto\" or \"tcg\": %w", kvmErr, errdefs.ErrFailedPrecondition)
		}
		return AccelKVM, nil
	case AccelTCG:
		return AccelTCG, nil
	}
	return "", fmt.Errorf("accel = %q: want \"auto\", \"kvm\" or \"tcg\": %w", want, errdefs.ErrInvalidArgument)
}
