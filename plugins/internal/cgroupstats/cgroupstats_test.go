package cgroupstats

import (
	"bufio"
	"strings"
	"testing"
)

func TestParseProcCgroup(t *testing.T) {
	hybrid := "12:pids:/kubepods/pod1/c1\n4:memory:/kubepods/pod1/c1\n2:cpu,cpuacct:/kubepods/pod1/c1\n1:name=systemd:/x\n0::/\n"
	tests := []struct {
		name    string
		in      string
		unified bool
		check   func(Paths) bool
		wantErr bool
	}{
		{"v1", hybrid, false, func(p Paths) bool {
			return p.Controllers["memory"] == "/kubepods/pod1/c1" && p.Controllers["cpuacct"] == "/kubepods/pod1/c1" && p.Controllers["systemd"] == "/x" && p.Unified == ""
		}, false},
		{"v2", "0::/kubepods/pod1/c1\n", true, func(p Paths) bool { return p.Unified == "/kubepods/pod1/c1" && p.Controllers == nil }, false},
		{"v2 missing", "4:memory:/a\n", true, nil, true},
		{"v1 missing", "0::/a\n", false, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := parseProcCgroup(bufio.NewScanner(strings.NewReader(tt.in)), tt.unified)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v", err)
			}
			if err == nil && !tt.check(p) {
				t.Fatalf("unexpected paths %+v", p)
			}
		})
	}
}

func TestFieldValue(t *testing.T) {
	v, err := fieldValue("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill")
	if err != nil || v != 3 {
		t.Fatalf("got %d %v", v, err)
	}
	if _, err := fieldValue("under_oom 0\n", "oom_kill"); err == nil {
		t.Fatal("expected an error for a missing field")
	}
}

func TestExpandSlice(t *testing.T) {
	tests := map[string]string{
		"kubepods-burstable-pod1.slice": "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice",
		"kubepods.slice":                "/kubepods.slice",
		"-.slice":                       "/",
		"/kubepods/pod1":                "/kubepods/pod1",
		"a--b.slice":                    "a--b.slice",
	}
	for in, want := range tests {
		if got := ExpandSlice(in); got != want {
			t.Errorf("ExpandSlice(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestSpecPath(t *testing.T) {
	for in, want := range map[string]string{
		"/kubepods/pod1/c1": "/kubepods/pod1/c1",
		"kubepods-burstable-pod1.slice:cri-containerd:abc": "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope",
		"system.slice::abc":  "/system.slice/abc.scope",
		"":                   "",
		"not:a:systemd/path": "not:a:systemd/path",
	} {
		if got := SpecPath(in); got != want {
			t.Errorf("SpecPath(%q) = %q, want %q", in, got, want)
		}
	}
}
