package wasm

import (
	"testing"

	v1stats "github.com/containerd/cgroups/v3/cgroup1/stats"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

func TestLimits(t *testing.T) {
	i64 := func(v int64) *int64 { return &v }
	u64 := func(v uint64) *uint64 { return &v }
	tests := []struct {
		name string
		res  *specs.LinuxResources
		want *api.Limits
	}{
		{"none", nil, &api.Limits{}},
		{"memory", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(64 << 20)}}, &api.Limits{MemoryBytes: 64 << 20}},
		{"unlimited memory", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(-1)}}, &api.Limits{}},
		{"cpu", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: i64(20000), Period: u64(100000), Shares: u64(512)}},
			&api.Limits{CpuQuota: 20000, CpuPeriod: 100000, CpuShares: 512}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := limits(tt.res); !proto.Equal(got, tt.want) {
				t.Fatalf("limits = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestPickLayer(t *testing.T) {
	layer := func(title string) ocispec.Descriptor {
		return ocispec.Descriptor{MediaType: "application/wasm", Annotations: map[string]string{ocispec.AnnotationTitle: title}}
	}
	one := []ocispec.Descriptor{layer("a.wasm")}
	two := []ocispec.Descriptor{layer("a.wasm"), layer("b.wasm")}
	tests := []struct {
		name    string
		layers  []ocispec.Descriptor
		arg0    string
		want    string
		wantErr bool
	}{
		{"the only one, whatever the command", one, "/x.wasm", "a.wasm", false},
		{"by title", two, "/app/b.wasm", "b.wasm", false},
		{"no match", two, "c.wasm", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := pickLayer(tt.layers, tt.arg0)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v", err)
			}
			if err != nil && !errdefs.IsInvalidArgument(err) {
				t.Fatalf("error class: %v", err)
			}
			if err == nil && got.Annotations[ocispec.AnnotationTitle] != tt.want {
				t.Fatalf("picked %v", got.Annotations)
			}
		})
	}
}

func TestMetrics(t *testing.T) {
	a, err := metrics(&api.ContainerStats{MemoryBytes: 4 << 20, MemoryMax: 8 << 20, MemoryLimit: 64 << 20, CpuUserNanos: 3, CpuSystemNanos: 4, CpuThrottledPeriods: 2})
	if err != nil {
		t.Fatal(err)
	}
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		t.Fatal(err)
	}
	m, ok := v.(*v1stats.Metrics)
	if !ok {
		t.Fatalf("metrics of type %T", v)
	}
	if m.CPU.Usage.Total != 7 || m.Memory.Usage.Usage != 4<<20 || m.Memory.Usage.Limit != 64<<20 || m.Memory.Usage.Max != 8<<20 || m.CPU.Throttling.ThrottledPeriods != 2 {
		t.Fatalf("metrics %+v", m)
	}
}

func TestPodMemoryLimit(t *testing.T) {
	sb := &sandbox.Sandbox{Config: &runtime.PodSandboxConfig{Linux: &runtime.LinuxPodSandboxConfig{
		Resources: &runtime.LinuxContainerResources{MemoryLimitInBytes: 96 << 20},
	}}}
	if got := podMemoryLimit(sb); got != 96<<20 {
		t.Fatalf("pod-level resources: %d", got)
	}
	sb.Config.Linux.Resources = nil
	sb.Config.Linux.CgroupParent = "/kuasar-unit-test-does-not-exist"
	if got := podMemoryLimit(sb); got != 0 {
		t.Fatalf("no cgroup: %d", got)
	}
}

func TestSysctls(t *testing.T) {
	for _, tc := range []struct {
		sysctls map[string]string
		ok      bool
	}{
		{map[string]string{"kernel.shmmax": "1"}, false},
		{map[string]string{"kernel.hostname": "x"}, false},
	} {
		p := &pod{sb: &sandbox.Sandbox{Config: &runtime.PodSandboxConfig{Linux: &runtime.LinuxPodSandboxConfig{Sysctls: tc.sysctls}}}}
		if err := p.applySysctls(); (err == nil) != tc.ok || (err != nil && !errdefs.IsInvalidArgument(err)) {
			t.Errorf("%v: %v", tc.sysctls, err)
		}
	}
}
