//go:build e2e

package integration

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestSharedPIDInitConfined attacks the init of a pod that shares its PID
// namespace from inside one of its containers, as a container with
// CAP_SYS_PTRACE (what `kubectl debug --profile=general` adds) would: it
// must see no more of the node through /proc/1 than it sees itself, as
// with stock pause.
func TestSharedPIDInitConfined(t *testing.T) {
	for _, handler := range []string{kuasarRunc, stockRunc} {
		t.Run(handler, func(t *testing.T) { testSharedPIDInitConfined(t, handler) })
	}
}

func testSharedPIDInitConfined(t *testing.T, handler string) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("attacker")
	podCfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	pod := d.runPod(t, handler, podCfg)
	cfg := ctrConfig("attacker", "sleep", "3600")
	cfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	cfg.Linux.SecurityContext.Capabilities = &runtimeapi.Capability{AddCapabilities: []string{"SYS_PTRACE"}}
	c := d.run(t, pod, podCfg, cfg)

	sh := func(script string) (string, int32) {
		out, stderr, code := d.execSync(t, c, "sh", "-c", script)
		return out + stderr, code
	}

	// Who pid 1 is: the pod's init, unprivileged.
	status, code := sh("cat /proc/1/status")
	if code != 0 {
		t.Fatalf("reading /proc/1/status: %s", status)
	}
	confined := []string{"Uid:\t65535\t65535\t65535\t65535", "Gid:\t65535\t65535\t65535\t65535", "CapEff:\t0000000000000000", "CapPrm:\t0000000000000000"}
	if handler == kuasarRunc {
		// Stricter than stock's pause, which keeps a bounding set.
		confined = append(confined, "CapBnd:\t0000000000000000", "NoNewPrivs:\t1")
	}
	for _, want := range confined {
		if !strings.Contains(status, want) {
			t.Errorf("pid 1 of the pod is not confined: no %q in\n%s", want, status)
		}
	}

	// Its network is the pod's: the same interfaces and routes the
	// container sees, none of the node's.
	for _, f := range []string{"dev", "route", "tcp", "unix"} {
		mine, _ := sh("cut -d: -f1 /proc/self/net/" + f + " | sort")
		init, code := sh("cut -d: -f1 /proc/1/net/" + f + " | sort")
		if f == "dev" || f == "route" {
			if code != 0 || mine != init {
				t.Errorf("/proc/1/net/%s is not the pod's:\npod's:\n%s\npid 1's:\n%s", f, mine, init)
			}
		}
	}
	if out, _ := sh("cat /proc/1/net/dev"); strings.Contains(out, d.Bridge) {
		t.Errorf("pid 1 sees the node's bridge %s:\n%s", d.Bridge, out)
	}

	// Its root shows nothing of the node, and cannot be written.
	root, code := sh("ls -a /proc/1/root/")
	if code != 0 {
		t.Fatalf("listing /proc/1/root: %s", root)
	}
	if handler == kuasarRunc {
		// Only its own binary, /proc and /dev (stock's pause image has
		// more files, none of the node's).
		for _, entry := range strings.Fields(root) {
			if entry != "." && entry != ".." && entry != "pause" && entry != "proc" && entry != "dev" {
				t.Errorf("pid 1's root holds %q: %s", entry, root)
			}
		}
		if out, code := sh("cat /proc/1/root/proc/keys | wc -c"); code != 0 || strings.TrimSpace(out) != "0" {
			t.Errorf("/proc/keys is not masked through pid 1's root: %s", out)
		}
	}
	for _, f := range []string{"/etc/hostname", "/etc/passwd", "/usr/bin/env", "/var/lib"} {
		if out, code := sh("ls -d /proc/1/root" + f); code == 0 {
			t.Errorf("a node path is reachable through /proc/1/root: %s", out)
		}
	}
	if out, code := sh("touch /proc/1/root/owned && echo wrote"); code == 0 || strings.Contains(out, "wrote") {
		t.Errorf("pid 1's root is writable from the container: %s", out)
	}

	// Its cgroup is the pod's, on the node.
	if handler == kuasarRunc {
		initPid := podInitPid(t, c, d)
		cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", initPid))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(cg), d.CgroupParent) {
			t.Errorf("pid 1 of the pod is not in the pod's cgroup %s:\n%s", d.CgroupParent, cg)
		}
	}
}

// podInitPid is the node pid of the init of a container's PID namespace.
func podInitPid(t *testing.T, c string, d *Daemon) int {
	t.Helper()
	ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", containerPid(t, d, c)))
	if err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid)); err != nil || l != ns {
			continue
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(line, "NSpid:"); ok {
				if f := strings.Fields(v); len(f) > 1 && f[len(f)-1] == "1" {
					return pid
				}
			}
		}
	}
	t.Fatalf("no init in the PID namespace of container %s", c)
	return 0
}
