package jail

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// The test binary is its own helper: run with helperEnv set, it is Main;
// with probeEnv, it is what runs in the jail and tries what a hypervisor
// taken over would.
const (
	helperEnv = "KUASAR_JAIL_TEST_HELPER"
	probeEnv  = "KUASAR_JAIL_TEST_PROBE"
)

func TestMain(m *testing.M) {
	switch {
	case os.Getenv(helperEnv) == "1" && len(os.Args) > 1:
		os.Exit(Main(os.Args[1:]))
	case os.Getenv(probeEnv) == "1":
		probe()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// probe prints what the system calls a jailed hypervisor could use
// against the node return.
func probe() {
	fd, err := unix.Open("/usr", unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		fmt.Println("open /usr:", err)
		return
	}
	// "shocker": the root directory of /usr's file system by handle,
	// outside the bind.
	h := unix.NewFileHandle(1 /* FILEID_INO32_GEN */, []byte{2, 0, 0, 0, 0, 0, 0, 0})
	if rfd, err := unix.OpenByHandleAt(fd, h, unix.O_RDONLY); err == nil {
		fmt.Println("open_by_handle_at: escaped")
		unix.Close(rfd)
	} else {
		fmt.Println("open_by_handle_at:", err)
	}
	fmt.Println("pid:", os.Getpid(), "ppid:", os.Getppid())
	if err := unix.Kill(os.Getppid(), 0); err == nil && os.Getppid() != 0 {
		fmt.Println("kill: reaches its parent")
	}
	if err := unix.Chmod("/dev/null", 0); err == nil {
		fmt.Println("chmod /dev/null: changed the node's device")
		_ = unix.Chmod("/dev/null", 0o666)
	} else {
		fmt.Println("chmod /dev/null:", err)
	}
	if f, err := os.OpenFile("/dev/null", os.O_WRONLY, 0); err != nil {
		fmt.Println("open /dev/null for writing:", err)
	} else {
		f.Close()
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec Spec
		ok   bool
	}{
		{"minimal", Spec{Root: "/run/j"}, true},
		{"full", Spec{Root: "/run/j", ReadOnly: []string{"/usr"}, Writable: []string{"/run/vm"}, Devices: []string{"/dev/kvm"}, Capabilities: []string{"CAP_CHOWN", "cap_fowner"}}, true},
		{"relative root", Spec{Root: "run/j"}, false},
		{"root is /", Spec{Root: "/"}, false},
		{"relative path", Spec{Root: "/run/j", ReadOnly: []string{"usr"}}, false},
		{"unclean path", Spec{Root: "/run/j", Writable: []string{"/run/../etc"}}, false},
		{"all of the node", Spec{Root: "/run/j", ReadOnly: []string{"/"}}, false},
		{"unknown capability", Spec{Root: "/run/j", Capabilities: []string{"CAP_EVERYTHING"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Command("/bin/helper", tc.spec, "/bin/true", nil)
			if (err == nil) != tc.ok {
				t.Errorf("Command(%+v) = %v, want ok %v", tc.spec, err, tc.ok)
			}
		})
	}
}

func TestCommand(t *testing.T) {
	path, argv, err := Command("/usr/bin/kuasar-keeper", Spec{Root: "/run/j"}, "/usr/bin/qemu", []string{"-m", "128"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/usr/bin/kuasar-keeper", Arg, `{"root":"/run/j"}`, "--", "/usr/bin/qemu", "-m", "128"}
	if path != want[0] || strings.Join(argv, " ") != strings.Join(want, " ") {
		t.Errorf("Command = %s %q, want %q", path, argv, want)
	}
}

func TestRefusesTheNodesNamespace(t *testing.T) {
	requireRoot(t)
	out, err := jailed(t, Spec{Root: filepath.Join(t.TempDir(), "root")}, false, "/bin/true")
	if err == nil || !strings.Contains(out, "mount namespace of its own") {
		t.Fatalf("a jail in the node's mount namespace ran: %v\n%s", err, out)
	}
}

// TestJail runs a shell in a jail and looks around from inside, as a
// hypervisor that a guest took over would.
func TestJail(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	work := filepath.Join(dir, "work")
	secret := filepath.Join(dir, "secret")
	for _, d := range []string{work, secret} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(secret, "key"), []byte("node secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(work, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	ram := filepath.Join(dir, "ram", "vm.ram")
	if err := os.Mkdir(filepath.Dir(ram), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ram, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	spec := Spec{
		Root: filepath.Join(dir, "root"),
		// A file beneath an earlier read-only bind (a guest kernel
		// installed under /usr) needs no mount point made.
		ReadOnly:     []string{"/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/usr/bin/true"},
		Writable:     []string{work, ram},
		Capabilities: []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE"},
	}
	spec.ReadOnly = existing(spec.ReadOnly)
	script := strings.Join([]string{
		"echo root: $(ls -A / | tr '\\n' ' ')",
		"test -e /etc/shadow && echo sees-shadow",
		"test -e " + secret + "/key && echo sees-secret",
		fmt.Sprintf("test -e /proc/%d && echo sees-the-test", os.Getpid()),
		"echo pid: $$",
		"chmod 0 /dev/null 2>/dev/null && echo chmod-device",
		"grep -E '^(CapBnd|CapPrm|CapInh|CapAmb|NoNewPrivs)' /proc/self/status",
		"touch /usr/jail-test 2>/dev/null && echo wrote-usr",
		"touch /jail-test 2>/dev/null && echo wrote-root",
		"echo x > " + work + "/file && echo wrote-work",
		"echo x > " + work + "/null 2>/dev/null && echo opened-device",
		"test -f " + ram + " && echo has-ram",
		"echo cwd: $(pwd)",
	}, "; ")
	out, err := jailed(t, spec, true, "/bin/sh", "-c", script)
	if err != nil {
		t.Fatalf("jailed shell: %v\n%s", err, out)
	}
	t.Logf("from inside the jail:\n%s", out)
	keep := uint64(1<<unix.CAP_CHOWN | 1<<unix.CAP_DAC_OVERRIDE)
	for _, want := range []string{
		fmt.Sprintf("CapBnd:\t%016x", keep),
		fmt.Sprintf("CapPrm:\t%016x", keep),
		"CapInh:\t0000000000000000",
		"CapAmb:\t0000000000000000",
		"NoNewPrivs:\t1",
		"wrote-work", "has-ram",
		"cwd: " + work,
		"pid: 1",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("inside the jail: no %q", want)
		}
	}
	for _, bad := range []string{"sees-shadow", "sees-secret", "sees-the-test", "wrote-usr", "wrote-root", "opened-device", "chmod-device"} {
		if strings.Contains(out, bad) {
			t.Errorf("inside the jail: %s", bad)
		}
	}
	for _, l := range strings.Split(out, "\n") {
		if root, ok := strings.CutPrefix(l, "root: "); ok {
			for _, e := range strings.Fields(root) {
				switch e {
				case "usr", "lib", "lib64", "bin", "etc", "dev", "proc", "tmp", strings.Split(dir, "/")[1]:
				default:
					t.Errorf("the jail's root holds %s", e)
				}
			}
		}
	}
	// Nothing of the jail is left on the node.
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), spec.Root) {
		t.Errorf("the jail's root is mounted on the node")
	}
}

// TestJailProbe runs a program in a jail that keeps 9p's capabilities
// (those kuasar-vmm gives QEMU) and tries to reach the node with them.
func TestJailProbe(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	self, err := filepath.EvalSymlinks(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	spec := Spec{
		Root:         filepath.Join(dir, "root"),
		ReadOnly:     existing([]string{"/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", self}),
		Writable:     []string{dir},
		Capabilities: []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_MKNOD", "CAP_SETFCAP"},
	}
	t.Setenv(probeEnv, "1")
	out, err := jailed(t, spec, true, self)
	if err != nil {
		t.Fatalf("probe: %v\n%s", err, out)
	}
	t.Logf("the probe says:\n%s", out)
	for _, want := range []string{"open_by_handle_at: operation not permitted", "pid: 1 ppid: 0", "chmod /dev/null: read-only file system"} {
		if !strings.Contains(out, want) {
			t.Errorf("probe: no %q", want)
		}
	}
	for _, bad := range []string{"escaped", "reaches its parent", "changed the node's device", "open /dev/null for writing"} {
		if strings.Contains(out, bad) {
			t.Errorf("probe: %s", bad)
		}
	}
}

// jailed runs argv through the helper (the test binary), in a mount
// namespace of its own if ownNS, from the first writable directory.
func jailed(t *testing.T, spec Spec, ownNS bool, argv ...string) (string, error) {
	t.Helper()
	_, args, err := Command(os.Args[0], spec, argv[0], argv[1:])
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], args[2:]...)
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	if len(spec.Writable) > 0 {
		cmd.Dir = spec.Writable[0]
	}
	if ownNS {
		// As kuasar-vmm spawns it.
		cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Cloneflags: syscall.CLONE_NEWPID}
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func existing(paths []string) []string {
	var out []string
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			out = append(out, p)
		} else if !errors.Is(err, os.ErrNotExist) {
			out = append(out, p)
		}
	}
	return out
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipped: jails need root (mount namespaces, pivot_root)")
	}
}
