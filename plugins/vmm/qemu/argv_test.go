package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

func baseConfig() hypervisor.Config {
	return hypervisor.Config{
		ID: "pod1", RunDir: "/run/kv/pod1", Kernel: "/g/vmlinux", Initrd: "/g/initrd",
		VCPUs: 1, MemoryMiB: 128, Accel: hypervisor.AccelTCG, TBSizeMiB: 32,
	}
}

// flags returns the values of every occurrence of flag in argv.
func flags(argv []string, flag string) []string {
	var v []string
	for i := 0; i+1 < len(argv); i++ {
		if argv[i] == flag {
			v = append(v, argv[i+1])
		}
	}
	return v
}

func TestArgv(t *testing.T) {
	tests := []struct {
		name   string
		mod    func(c *hypervisor.Config)
		flag   string
		want   []string // substrings, each in one value of flag
		absent []string // values of flag that must not be there
	}{
		{"tcg", nil, "-accel", []string{"tcg,tb-size=32"}, []string{"kvm"}},
		{"tcg cpu", nil, "-cpu", []string{"max"}, nil},
		{"kvm", func(c *hypervisor.Config) { c.Accel = hypervisor.AccelKVM }, "-accel", []string{"kvm"}, []string{"tcg,tb-size=32"}},
		{"kvm cpu", func(c *hypervisor.Config) { c.Accel = hypervisor.AccelKVM }, "-cpu", []string{"host"}, nil},
		{"machine", nil, "-machine", []string{"q35,", "memory-backend=mem0"}, nil},
		{"memfd", nil, "-object", []string{"memory-backend-memfd,id=mem0,size=128M,share=off"}, nil},
		{"file for a template", func(c *hypervisor.Config) {
			c.Memory = hypervisor.MemoryBackend{Kind: hypervisor.MemoryFile, Path: "/dev/shm/t,1", Share: true}
		}, "-object", []string{"memory-backend-file,id=mem0,size=128M,mem-path=/dev/shm/t,,1,share=on"}, nil},
		{"serial channel", nil, "-device", []string{"virtserialport,bus=vser0.0,nr=1,chardev=agent,name=kuasar.agent"}, nil},
		{"serial socket", nil, "-chardev", []string{"socket,id=agent,path=/run/kv/pod1/agent.sock,server=on,wait=off"}, nil},
		{"qmp", nil, "-chardev", []string{"socket,id=qmp,path=/run/kv/pod1/qmp.sock,server=on,wait=off"}, nil},
		{"vsock", func(c *hypervisor.Config) { c.Channel = hypervisor.ChannelVsock; c.VsockCID = 7 }, "-device",
			[]string{"vhost-vsock-pci,id=vsock0,guest-cid=7"}, []string{"virtio-serial-pci,id=vser0,max_ports=2"}},
		{"9p", func(c *hypervisor.Config) { c.Shares = []hypervisor.Share{{Tag: "kuasar", Path: "/s", ReadOnly: true}} },
			"-fsdev", []string{"local,id=fs0,path=/s,security_model=passthrough,multidevs=remap,readonly=on"}, nil},
		{"virtiofs", func(c *hypervisor.Config) {
			c.Shares = []hypervisor.Share{{Tag: "kuasar", Kind: hypervisor.ShareVirtiofs, Socket: "/r/vfs.sock"}}
			c.Memory.Share = true
		}, "-device", []string{"vhost-user-fs-pci,chardev=vfs0,tag=kuasar"}, nil},
		{"hotplug slots", func(c *hypervisor.Config) { c.HotplugSlots = 2 }, "-device",
			[]string{"pcie-root-port,id=hp0,bus=pcie.0,chassis=1", "pcie-root-port,id=hp1,bus=pcie.0,chassis=2"}, nil},
		{"no spawning", nil, "-sandbox", []string{"spawn=deny"}, nil},
		{"spawning for a template", func(c *hypervisor.Config) { c.AllowSpawn = true }, "-sandbox",
			[]string{"on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny"}, []string{"on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny,spawn=deny"}},
		{"incoming", func(c *hypervisor.Config) { c.Incoming = true }, "-incoming", []string{"defer"}, nil},
		{"kernel args", func(c *hypervisor.Config) { c.KernelArgs = []string{"kuasar.log=debug"} }, "-append",
			[]string{"console=ttyS0 quiet panic=-1", " kuasar.log=debug"}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := baseConfig()
			if tc.mod != nil {
				tc.mod(&cfg)
			}
			vals := flags(Argv(cfg), tc.flag)
			for _, w := range tc.want {
				found := false
				for _, v := range vals {
					found = found || strings.Contains(v, w)
				}
				if !found {
					t.Errorf("%s: no value with %q in %q", tc.flag, w, vals)
				}
			}
			for _, a := range tc.absent {
				for _, v := range vals {
					if v == a {
						t.Errorf("%s %q should not be there", tc.flag, a)
					}
				}
			}
		})
	}
}

func TestArgvFixed(t *testing.T) {
	a := strings.Join(Argv(baseConfig()), " ")
	for _, w := range []string{"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-pidfile /run/kv/pod1/qemu.pid",
		"-kernel /g/vmlinux", "-initrd /g/initrd", "-smp 1", "-m 128M", "-device vmgenid,guid=auto", "-serial chardev:console"} {
		if !strings.Contains(a, w) {
			t.Errorf("argv lacks %q: %s", w, a)
		}
	}
	if strings.Contains(a, " -S") {
		t.Error("paused without StartPaused")
	}
}

func TestPrepare(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd := filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd")
	os.WriteFile(kernel, nil, 0o644)
	os.WriteFile(initrd, nil, 0o644)
	run := filepath.Join(dir, "run")
	tests := []struct {
		name string
		mod  func(c *hypervisor.Config)
		is   error
	}{
		{"ok", nil, nil},
		{"missing kernel", func(c *hypervisor.Config) { c.Kernel = filepath.Join(dir, "none") }, errdefs.ErrNotFound},
		{"missing qemu", func(c *hypervisor.Config) { c.Binary = "/nonexistent/qemu" }, errdefs.ErrNotFound},
		{"long run dir", func(c *hypervisor.Config) { c.RunDir = "/" + strings.Repeat("x", hypervisor.MaxRunDirLen) }, errdefs.ErrInvalidArgument},
		{"auto accel", func(c *hypervisor.Config) { c.Accel = hypervisor.AccelAuto }, errdefs.ErrInvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := baseConfig()
			cfg.Kernel, cfg.Initrd, cfg.RunDir = kernel, initrd, run
			cfg.Binary = "/bin/true" // stands in for QEMU: Prepare only resolves it
			if tc.mod != nil {
				tc.mod(&cfg)
			}
			l, st, err := Driver{}.Prepare(context.Background(), cfg)
			if tc.is != nil {
				if !errors.Is(err, tc.is) {
					t.Fatalf("err %v, want %v", err, tc.is)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if l.Path != "/bin/true" || len(l.Args) == 0 {
				t.Errorf("launch %+v", l)
			}
			if st.Hypervisor != Name || st.ChannelSocket != filepath.Join(run, "agent.sock") || st.ControlSocket != filepath.Join(run, "qmp.sock") || st.Pid != 0 {
				t.Errorf("state %+v", st)
			}
			if fi, err := os.Stat(run); err != nil || fi.Mode().Perm() != 0o700 {
				t.Errorf("run dir: %v %v", fi, err)
			}
		})
	}
}

func TestAttachGone(t *testing.T) {
	st := hypervisor.State{Hypervisor: Name, ID: "x", Pid: 1 << 22, StartTime: 1, ControlSocket: "/nonexistent"}
	if _, err := (Driver{}).Attach(context.Background(), st); !errdefs.IsNotFound(err) {
		t.Fatalf("attach to a gone VM: %v", err)
	}
	// A pid file naming a process that is not this VM's QEMU.
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "qemu.pid")
	os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644)
	st = hypervisor.State{Hypervisor: Name, ID: "x", PidFile: pidFile, ControlSocket: filepath.Join(dir, "qmp.sock")}
	if _, err := (Driver{}).Attach(context.Background(), st); !errdefs.IsNotFound(err) {
		t.Fatalf("attach to a pid that is not QEMU: %v", err)
	}
	st.Hypervisor = "firecracker"
	if _, err := (Driver{}).Attach(context.Background(), st); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("attach with another driver's state: %v", err)
	}
}

func TestLogTail(t *testing.T) {
	for _, tc := range []struct {
		name, log string
		limit     int
		want      string
	}{
		{"none", "", 512, ""},
		{"short", "kuasar-keeper jail: jail: stat /gone: no such file or directory\n", 512, "kuasar-keeper jail: jail: stat /gone: no such file or directory"},
		{"long", strings.Repeat("x", 1000) + "\nthe end\n", 8, "the end"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.log != "" {
				if err := os.WriteFile(filepath.Join(dir, logName), []byte(tc.log), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if got := LogTail(dir, tc.limit); got != tc.want {
				t.Errorf("LogTail = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestAccess(t *testing.T) {
	base := func() hypervisor.Config {
		return hypervisor.Config{ID: "vm", RunDir: "/run/v/1", Kernel: "/img/vmlinux", Initrd: "/img/initrd", Accel: hypervisor.AccelTCG}
	}
	for _, tc := range []struct {
		name                        string
		mod                         func(*hypervisor.Config)
		readOnly, writable, devices []string
		notWritable, notDevices     []string
		capabilities                bool
	}{
		{"tcg, no share", nil, []string{"/usr", "/img/vmlinux", "/img/initrd"}, []string{"/run/v/1"}, nil, nil, []string{"/dev/kvm", "/dev/vhost-vsock"}, false},
		{"9p share", func(c *hypervisor.Config) { c.Shares = []hypervisor.Share{{Tag: "s", Path: "/sb/shared"}} }, nil, []string{"/sb/shared"}, nil, nil, nil, true},
		{"read-only share", func(c *hypervisor.Config) { c.Shares = []hypervisor.Share{{Tag: "s", Path: "/sb/ro", ReadOnly: true}} }, []string{"/sb/ro"}, nil, nil, []string{"/sb/ro"}, nil, true},
		{"kvm and vsock", func(c *hypervisor.Config) {
			c.Accel, c.Channel, c.VsockCID = hypervisor.AccelKVM, hypervisor.ChannelVsock, 3
		}, nil, nil, []string{"/dev/kvm", "/dev/vhost-vsock"}, nil, nil, false},
		{"template RAM", func(c *hypervisor.Config) {
			c.Memory = hypervisor.MemoryBackend{Kind: hypervisor.MemoryFile, Path: "/dev/shm/t/1.ram"}
		}, nil, []string{"/dev/shm/t/1.ram"}, nil, nil, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := base()
			if tc.mod != nil {
				tc.mod(&cfg)
			}
			a := access("/usr/bin/qemu-system-x86_64", cfg)
			for _, c := range []struct {
				what  string
				list  []string
				paths []string
				want  bool
			}{
				{"read-only", a.ReadOnly, tc.readOnly, true},
				{"writable", a.Writable, tc.writable, true},
				{"writable", a.Writable, tc.notWritable, false},
				{"devices", a.Devices, tc.devices, true},
				{"devices", a.Devices, tc.notDevices, false},
			} {
				for _, p := range c.paths {
					if slices.Contains(c.list, p) != c.want {
						t.Errorf("%s %v: has %s is %v, want %v", c.what, c.list, p, !c.want, c.want)
					}
				}
			}
			if got := len(a.Capabilities) > 0; got != tc.capabilities {
				t.Errorf("capabilities %v, want some: %v", a.Capabilities, tc.capabilities)
			}
		})
	}
}
