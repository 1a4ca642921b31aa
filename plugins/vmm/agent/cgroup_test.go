package agent

import (
	"math"
	"os"
	"path/filepath"
	"testing"

	v2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
)

func TestReadMetrics(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{
		"pids.current":   "3\n",
		"pids.max":       "max\n",
		"cpu.stat":       "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
		"memory.current": "4096000\n",
		"memory.max":     "16777216\n",
		"memory.stat":    "anon 1000\nfile 2000\ninactive_file 300\npgfault 7\nnot a pair\n",
		"memory.events":  "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n",
		"io.stat":        "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\nbad\n",
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	m, err := readMetrics(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.Pids.Current != 3 || m.Pids.Limit != math.MaxUint64 {
		t.Errorf("pids %+v", m.Pids)
	}
	if m.CPU.UsageUsec != 1500 || m.CPU.UserUsec != 1000 || m.CPU.SystemUsec != 500 {
		t.Errorf("cpu %+v", m.CPU)
	}
	if m.Memory.Usage != 4096000 || m.Memory.UsageLimit != 16<<20 || m.Memory.Anon != 1000 || m.Memory.File != 2000 ||
		m.Memory.InactiveFile != 300 || m.Memory.Pgfault != 7 || m.Memory.SwapUsage != 0 {
		t.Errorf("memory %+v", m.Memory)
	}
	if m.MemoryEvents == nil || m.MemoryEvents.OomKill != 1 || m.MemoryEvents.Oom != 2 || m.MemoryEvents.Max != 12 {
		t.Errorf("memory events %+v", m.MemoryEvents)
	}
	want := &v2stats.IOEntry{Major: 254, Minor: 0, Rbytes: 4096, Wbytes: 8192, Rios: 1, Wios: 2}
	if len(m.Io.Usage) != 1 || m.Io.Usage[0].String() != want.String() {
		t.Errorf("io %v", m.Io.Usage)
	}

	// A cgroup without the memory controller, and one that is not there.
	os.Remove(filepath.Join(dir, "memory.events"))
	os.Remove(filepath.Join(dir, "memory.stat"))
	if m, err := readMetrics(dir); err != nil || m.MemoryEvents != nil || m.Memory.Anon != 0 {
		t.Errorf("without memory files: %v, %v", m, err)
	}
	m, err = readMetrics(filepath.Join(dir, "gone"))
	if err != nil || m.CPU != nil || m.Memory != nil {
		t.Errorf("a missing cgroup: %v, %v", m, err)
	}
}

func TestCgroupMetricsNoGroup(t *testing.T) {
	if _, err := cgroupMetrics(""); err == nil {
		t.Error("metrics of no cgroup")
	}
}
