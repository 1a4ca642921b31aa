package task

import (
	"testing"

	v1stats "github.com/containerd/cgroups/v3/cgroup1/stats"
	v2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/typeurl/v2"
)

func TestCompleteStats(t *testing.T) {
	tests := []struct {
		name string
		in   *v1stats.Metrics
	}{
		{"bare", &v1stats.Metrics{}},
		{"cpu usage only", &v1stats.Metrics{CPU: &v1stats.CPUStat{Usage: &v1stats.CPUUsage{Total: 5}}}},
		{"memory usage only", &v1stats.Metrics{Memory: &v1stats.MemoryStat{Usage: &v1stats.MemoryEntry{Usage: 7}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := v1Of(t, completeStats(typeurl.MarshalProto(mustAny(t, tt.in))))
			if m.CPU != nil && (m.CPU.Usage == nil || m.CPU.Throttling == nil) {
				t.Errorf("cpu: %+v", m.CPU)
			}
			if mm := m.Memory; mm != nil && (mm.Usage == nil || mm.Swap == nil || mm.Kernel == nil || mm.KernelTCP == nil) {
				t.Errorf("memory: %+v", mm)
			}
			if tt.in.CPU != nil && m.CPU.Usage.Total != 5 || tt.in.Memory != nil && m.Memory.Usage.Usage != 7 {
				t.Errorf("figures changed: %+v", m)
			}
		})
	}
	v2 := mustAny(t, &v2stats.Metrics{CPU: &v2stats.CPUStat{UsageUsec: 3}})
	if got := completeStats(v2); got != v2 {
		t.Errorf("v2 metrics were changed")
	}
}

func mustAny(t *testing.T, v any) typeurl.Any {
	t.Helper()
	a, err := typeurl.MarshalAny(v)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func v1Of(t *testing.T, a typeurl.Any) *v1stats.Metrics {
	t.Helper()
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		t.Fatal(err)
	}
	m, ok := v.(*v1stats.Metrics)
	if !ok {
		t.Fatalf("not v1 metrics: %T", v)
	}
	return m
}
