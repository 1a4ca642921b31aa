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

// The test binary is its own helper: run with helperEnv set, it is Main.
const helperEnv = "KUASAR_JAIL_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		os.Exit(Main(os.Args[1:]))
	}
	os.Exit(m.Run())
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
	spec := Spec{
		Root:         filepath.Join(dir, "root"),
		ReadOnly:     []string{"/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"},
		Writable:     []string{work, ram},
		Capabilities: []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE"},
	}
	spec.ReadOnly = existing(spec.ReadOnly)
	script := strings.Join([]string{
		"echo root: $(ls -A / | tr '\\n' ' ')",
		"test -e /etc/shadow && echo sees-shadow",
		"test -e " + secret + "/key && echo sees-secret",
		"test -e /proc/1/status && echo sees-init",
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
	} {
		if !strings.Contains(out, want) {
			t.Errorf("inside the jail: no %q", want)
		}
	}
	for _, bad := range []string{"sees-shadow", "sees-secret", "sees-init", "wrote-usr", "wrote-root", "opened-device"} {
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
	if _, err := os.Stat(ram); err != nil {
		t.Errorf("the writable file to be made: %v", err)
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
		cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
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
