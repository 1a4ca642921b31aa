package hypervisor

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestResolveAccel(t *testing.T) {
	noKVM := errors.New("open /dev/kvm: no such file or directory")
	tests := []struct {
		want   string
		kvmErr error
		got    Accel
		is     error
	}{
		{"auto", nil, AccelKVM, nil},
		{"", noKVM, AccelTCG, nil},
		{"AUTO", noKVM, AccelTCG, nil},
		{"kvm", nil, AccelKVM, nil},
		{"kvm", noKVM, "", errdefs.ErrFailedPrecondition},
		{"tcg", nil, AccelTCG, nil},
		{"hvf", nil, "", errdefs.ErrInvalidArgument},
	}
	for _, tc := range tests {
		got, err := ResolveAccel(tc.want, tc.kvmErr)
		if got != tc.got || (tc.is == nil) != (err == nil) || (tc.is != nil && !errors.Is(err, tc.is)) {
			t.Errorf("ResolveAccel(%q, %v) = %q, %v", tc.want, tc.kvmErr, got, err)
		}
	}
}

func TestValidate(t *testing.T) {
	ok := Config{ID: "a", RunDir: "/run/a", Kernel: "k", Initrd: "i", VCPUs: 1, MemoryMiB: 128, Accel: AccelTCG}
	tests := []struct {
		name string
		mod  func(c *Config)
		bad  bool
	}{
		{"ok", func(c *Config) {}, false},
		{"no id", func(c *Config) { c.ID = "" }, true},
		{"relative run dir", func(c *Config) { c.RunDir = "run" }, true},
		{"unresolved accel", func(c *Config) { c.Accel = AccelAuto }, true},
		{"tiny memory", func(c *Config) { c.MemoryMiB = 16 }, true},
		{"no cpu", func(c *Config) { c.VCPUs = 0 }, true},
		{"vsock without cid", func(c *Config) { c.Channel = ChannelVsock }, true},
		{"vsock", func(c *Config) { c.Channel = ChannelVsock; c.VsockCID = 3 }, false},
		{"duplicate tags", func(c *Config) { c.Shares = []Share{{Tag: "a", Path: "/a"}, {Tag: "a", Path: "/b"}} }, true},
		{"virtiofs without shared memory", func(c *Config) { c.Shares = []Share{{Tag: "a", Kind: ShareVirtiofs, Socket: "/s"}} }, true},
		{"memory file relative", func(c *Config) { c.Memory = MemoryBackend{Kind: MemoryFile, Path: "x"} }, true},
		{"unknown memory", func(c *Config) { c.Memory = MemoryBackend{Kind: "hugepages"} }, true},
	}
	for _, tc := range tests {
		c := ok
		tc.mod(&c)
		err := c.Validate()
		if tc.bad != (err != nil) || (err != nil && !errdefs.IsInvalidArgument(err)) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

func TestKVMUsable(t *testing.T) {
	withVMX := []byte("processor\t: 0\nflags\t\t: fpu vme vmx sse\n\nprocessor\t: 1\nflags\t\t: fpu vme vmx sse\n")
	noVirt := []byte("processor\t: 0\nflags\t\t: fpu vme sse hypervisor\n")
	if hasCPUFlag(noVirt, "vmx") || !hasCPUFlag(withVMX, "vmx") || hasCPUFlag(withVMX, "vm") {
		t.Error("hasCPUFlag")
	}
	// /dev/null answers no KVM ioctl; a missing device fails to open.
	if err := kvmUsable("/nonexistent/kvm", withVMX, false); err == nil {
		t.Error("missing device usable")
	}
	if err := kvmUsable("/dev/null", withVMX, false); err == nil {
		t.Error("/dev/null usable as KVM")
	}
	if _, err := os.Stat(KVMDevice); err == nil {
		err := kvmUsable(KVMDevice, noVirt, true)
		if err == nil || !strings.Contains(err.Error(), "kvm-pvm") {
			t.Errorf("KVM without VMX/SVM: %v", err)
		}
	} else {
		t.Logf("no %s here: the check of a KVM without VMX/SVM is not exercised", KVMDevice)
	}
}

func TestStateJSON(t *testing.T) {
	st := State{Hypervisor: "qemu", ID: "p", Pid: 42, StartTime: 7, RunDir: "/run/x", PidFile: "/run/x/qemu.pid",
		ControlSocket: "/run/x/qmp.sock", Channel: ChannelSerial, ChannelSocket: "/run/x/agent.sock", Accel: AccelTCG}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var got State
	if err := json.Unmarshal(b, &got); err != nil || got != st {
		t.Fatalf("round trip: %+v %v (%s)", got, err, b)
	}
}
