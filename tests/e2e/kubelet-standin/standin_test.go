package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
	drapbv1beta1 "k8s.io/kubelet/pkg/apis/dra/v1beta1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/utils/ptr"
)

// fakePlugin is a DRA plugin in Go that advertises v1 and v1beta1 and records which
// service version each call arrived on.
type fakePlugin struct {
	registerapi.UnimplementedRegistrationServer
	driver, endpoint string

	mu           sync.Mutex
	calls        []string
	registration *registerapi.RegistrationStatus
}

func (p *fakePlugin) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{Type: registerapi.DRAPlugin, Name: p.driver, Endpoint: p.endpoint,
		SupportedVersions: []string{drapbv1.DRAPluginService, drapbv1beta1.DRAPluginService}}, nil
}

func (p *fakePlugin) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.registration = s
	return &registerapi.RegistrationStatusResponse{}, nil
}

func (p *fakePlugin) record(call string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls = append(p.calls, call)
}

func (p *fakePlugin) recorded() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.calls)
}

func (p *fakePlugin) cdiID(uid string) string { return "k8s." + p.driver + "/claim=" + uid + "-gpu-0" }

func (p *fakePlugin) prepare(claims []*drapbv1.Claim) map[string]*drapbv1.NodePrepareResourceResponse {
	out := map[string]*drapbv1.NodePrepareResourceResponse{}
	for _, c := range claims {
		out[c.Uid] = &drapbv1.NodePrepareResourceResponse{Devices: []*drapbv1.Device{{
			PoolName: "node-a", DeviceName: "gpu-0", CdiDeviceIds: []string{p.cdiID(c.Uid)}}}}
	}
	return out
}

type v1Service struct {
	drapbv1.UnimplementedDRAPluginServer
	p *fakePlugin
}

func (s v1Service) NodePrepareResources(_ context.Context, r *drapbv1.NodePrepareResourcesRequest) (*drapbv1.NodePrepareResourcesResponse, error) {
	s.p.record("v1/NodePrepareResources")
	return &drapbv1.NodePrepareResourcesResponse{Claims: s.p.prepare(r.Claims)}, nil
}

func (s v1Service) NodeUnprepareResources(_ context.Context, r *drapbv1.NodeUnprepareResourcesRequest) (*drapbv1.NodeUnprepareResourcesResponse, error) {
	s.p.record("v1/NodeUnprepareResources")
	out := map[string]*drapbv1.NodeUnprepareResourceResponse{}
	for _, c := range r.Claims {
		out[c.Uid] = &drapbv1.NodeUnprepareResourceResponse{}
	}
	return &drapbv1.NodeUnprepareResourcesResponse{Claims: out}, nil
}

type v1beta1Service struct {
	drapbv1beta1.UnimplementedDRAPluginServer
	p *fakePlugin
}

func (s v1beta1Service) NodePrepareResources(_ context.Context, r *drapbv1beta1.NodePrepareResourcesRequest) (*drapbv1beta1.NodePrepareResourcesResponse, error) {
	s.p.record("v1beta1/NodePrepareResources")
	out := map[string]*drapbv1beta1.NodePrepareResourceResponse{}
	for _, c := range r.Claims {
		out[c.Uid] = &drapbv1beta1.NodePrepareResourceResponse{Devices: []*drapbv1beta1.Device{{
			PoolName: "node-a", DeviceName: "gpu-0", CdiDeviceIds: []string{s.p.cdiID(c.Uid)}}}}
	}
	return &drapbv1beta1.NodePrepareResourcesResponse{Claims: out}, nil
}

func (s v1beta1Service) NodeUnprepareResources(_ context.Context, r *drapbv1beta1.NodeUnprepareResourcesRequest) (*drapbv1beta1.NodeUnprepareResourcesResponse, error) {
	s.p.record("v1beta1/NodeUnprepareResources")
	out := map[string]*drapbv1beta1.NodeUnprepareResourceResponse{}
	for _, c := range r.Claims {
		out[c.Uid] = &drapbv1beta1.NodeUnprepareResourceResponse{}
	}
	return &drapbv1beta1.NodeUnprepareResourcesResponse{Claims: out}, nil
}

// serve starts the plugin like the Go helper does: DRA socket first, then the
// registration socket in the registry dir.
func (p *fakePlugin) serve(t *testing.T, registryDir string) {
	t.Helper()
	dra := grpc.NewServer()
	drapbv1.RegisterDRAPluginServer(dra, v1Service{p: p})
	drapbv1beta1.RegisterDRAPluginServer(dra, v1beta1Service{p: p})
	reg := grpc.NewServer()
	registerapi.RegisterRegistrationServer(reg, p)
	for server, path := range map[*grpc.Server]string{dra: p.endpoint, reg: filepath.Join(registryDir, p.driver+"-reg.sock")} {
		listener, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		go server.Serve(listener) //nolint:errcheck // ends with Stop
		t.Cleanup(server.Stop)
	}
}

func waitFor[T any](t *testing.T, what string, probe func() (T, bool)) T {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if v, ok := probe(); ok {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func readJSON[T any](path string) (T, bool) {
	var v T
	data, err := os.ReadFile(path)
	if err != nil {
		return v, false
	}
	return v, json.Unmarshal(data, &v) == nil
}

func TestPrepareAndUnprepareThroughKubeletCode(t *testing.T) {
	for _, tc := range []struct {
		draAPI  string
		service string
		method  string
	}{
		{"v1", "v1", "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources"},
		{"v1beta1", "v1beta1", "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources"},
	} {
		t.Run(tc.draAPI, func(t *testing.T) {
			// Short paths: a unix socket path must fit in 108 bytes.
			root, err := os.MkdirTemp("", "standin")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(root) }) //nolint:errcheck // best effort
			registryDir := filepath.Join(root, "registry")
			statusDir := filepath.Join(root, "status")
			for _, dir := range []string{registryDir, filepath.Join(root, "plugin")} {
				if err := os.MkdirAll(dir, 0o750); err != nil {
					t.Fatal(err)
				}
			}
			driver := tc.draAPI + ".test.dra.dev"
			plugin := &fakePlugin{driver: driver, endpoint: filepath.Join(root, "plugin", "dra.sock")}
			plugin.serve(t, registryDir)

			pod, claim := podWithClaim("node-a", driver)
			client := fake.NewClientset(&v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}, claim, pod)
			opts := options{nodeName: "node-a", registryDir: registryDir, driverName: driver,
				draAPI: tc.draAPI, statusDir: statusDir, stateDir: filepath.Join(root, "state"), workers: 2}
			status, err := newStatusDir(statusDir)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			s, err := newStandin(ctx, client, opts, status)
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- s.run(ctx) }()
			t.Cleanup(func() {
				cancel()
				if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
					t.Error(err)
				}
				s.stop()
			})

			podFile := filepath.Join(statusDir, "pods", string(pod.UID)+".json")
			prepared := waitFor(t, "pod prepared", func() (podStatus, bool) {
				st, ok := readJSON[podStatus](podFile)
				return st, ok && st.State == statePrepared
			})
			want := []string{plugin.cdiID(string(claim.UID))}
			if got := prepared.Containers["main"]; !slices.Equal(got, want) {
				t.Errorf("CDI ids of container main = %v, want %v", got, want)
			}
			if len(prepared.Claims) != 1 || prepared.Claims[0].Drivers[driver][0].Device != "gpu-0" {
				t.Errorf("claims = %+v, want one with device gpu-0 of %s", prepared.Claims, driver)
			}
			if got := plugin.recorded(); !slices.Equal(got, []string{tc.service + "/NodePrepareResources"}) {
				t.Errorf("plugin calls = %v, want one %s NodePrepareResources", got, tc.service)
			}
			plugin.mu.Lock()
			if plugin.registration == nil || !plugin.registration.PluginRegistered {
				t.Errorf("registration status = %+v, want registered", plugin.registration)
			}
			plugin.mu.Unlock()
			calls, _ := readJSON[[]grpcCall](filepath.Join(statusDir, "grpc-calls.json"))
			if !slices.ContainsFunc(calls, func(c grpcCall) bool {
				return c.Driver == driver && c.Method == tc.method && c.Code == "OK" && c.Count == 1
			}) {
				t.Errorf("grpc-calls.json = %+v, want one OK %s", calls, tc.method)
			}

			if err := client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "pod unprepared", func() (podStatus, bool) {
				st, ok := readJSON[podStatus](podFile)
				return st, ok && st.State == stateUnprepared
			})
			wantCalls := []string{tc.service + "/NodePrepareResources", tc.service + "/NodeUnprepareResources"}
			if got := plugin.recorded(); !slices.Equal(got, wantCalls) {
				t.Errorf("plugin calls = %v, want %v", got, wantCalls)
			}
		})
	}
}

func TestUnknownDRAAPIIsRejected(t *testing.T) {
	_, err := parseFlags([]string{"--kubeconfig=k", "--node-name=n", "--registry-dir=r",
		"--status-dir=s", "--dra-api=v1alpha4"})
	if err == nil || err.Error() != `--dra-api: "v1alpha4" is not one of v1, v1beta1` {
		t.Fatalf("err = %v, want the --dra-api error", err)
	}
}

// podWithClaim is a pod bound to node with one claim, allocated to driver and reserved
// for the pod, as the scheduler leaves them.
func podWithClaim(node, driver string) (*v1.Pod, *resourceapi.ResourceClaim) {
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "pod", Namespace: "ns", UID: types.UID("11111111-2222-3333-4444-555555555555")},
		Spec: v1.PodSpec{
			NodeName:       node,
			ResourceClaims: []v1.PodResourceClaim{{Name: "gpu", ResourceClaimName: ptr.To("claim")}},
			Containers: []v1.Container{{Name: "main", Image: "pause",
				Resources: v1.ResourceRequirements{Claims: []v1.ResourceClaim{{Name: "gpu"}}}}},
		},
	}
	claim := &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "claim", Namespace: "ns", UID: types.UID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")},
		Status: resourceapi.ResourceClaimStatus{
			Allocation: &resourceapi.AllocationResult{Devices: resourceapi.DeviceAllocationResult{
				Results: []resourceapi.DeviceRequestAllocationResult{{
					Request: "gpu", Driver: driver, Pool: node, Device: "gpu-0"}}}},
			ReservedFor: []resourceapi.ResourceClaimConsumerReference{{Resource: "pods", Name: pod.Name, UID: pod.UID}},
		},
	}
	return pod, claim
}
