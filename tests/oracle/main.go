// Command oracle runs the structured allocator of kube-scheduler v1.37.2
// (k8s.io/dynamic-resource-allocation v0.37.2) on JSON problems, so the Python
// allocator can be held to it.
//
// Input on stdin: one JSON object per line,
//
//	{"node": {"name": "n1", "labels": {}}, "classes": [...], "slices": [...],
//	 "taintRules": [...DeviceTaintRules...],
//	 "allocated": [...ResourceClaims with status.allocation...], "claims": [...],
//	 "benchIterations": 0}
//
// Output on stdout: one JSON object per input line,
//
//	{"status": "allocated"|"unschedulable"|"error"|"timeout", "error": "...",
//	 "allocations": [AllocationResult...], "nodes": <allocateOne calls>,
//	 "nanosMedian": <with benchIterations > 0: median ns of NewAllocator+Allocate>}
//
// A line with "celExpression" instead evaluates one selector on one device with the
// scheduler's CEL compiler:
//
//	{"celExpression": "...", "device": {"driver": "d", "attributes": {...},
//	 "capacity": {...}, "allowMultipleAllocations": false}}
//
// answered with {"status": "compile-error"|"runtime-error"|"true"|"false", "error": "..."}.
// An expression whose estimated cost exceeds the API's limit is a compile error, as the
// API server refuses it when the claim is created.
//
// The feature set is the scheduler's default in v1.37 (see features below), which
// selects the "incubating" allocator. DeviceTaintRules reach the allocator as the
// scheduler's ResourceSlice tracker (on by default: DRADeviceTaintRules is GA in
// v1.37) patches them into the slices.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"sort"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/dynamic-resource-allocation/cel"
	"k8s.io/dynamic-resource-allocation/resourceslice/tracker"
	"k8s.io/dynamic-resource-allocation/structured"
	"k8s.io/utils/ptr"
)

// The DRA feature gates that are on by default in kube-scheduler v1.37.2
// (pkg/features/kube_features.go), mapped as the DynamicResources plugin maps them.
var features = structured.Features{
	AdminAccess:             true,
	PrioritizedList:         true,
	PartitionableDevices:    true,
	DeviceTaints:            true,
	DeviceBindingAndStatus:  true,
	ConsumableCapacity:      true,
	FractionalCapacityRange: true,
}

type input struct {
	Node struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"node"`
	// Nodes, when set, replaces Node: Allocate runs for each in turn (one allocator,
	// as in one scheduling cycle's Filter calls) and the first allocation is returned.
	Nodes           []string                       `json:"nodes"`
	Classes         []*resourceapi.DeviceClass     `json:"classes"`
	Slices          []*resourceapi.ResourceSlice   `json:"slices"`
	TaintRules      []*resourceapi.DeviceTaintRule `json:"taintRules"`
	Allocated       []*resourceapi.ResourceClaim   `json:"allocated"`
	Claims          []*resourceapi.ResourceClaim   `json:"claims"`
	BenchIterations int                            `json:"benchIterations"`
	CELExpression   *string                        `json:"celExpression"`
	Device          celDevice                      `json:"device"`
	// TimeoutSeconds bounds one Allocate call, like the scheduler's filter timeout
	// (default 10 s); 0 means that default.
	TimeoutSeconds float64 `json:"timeoutSeconds"`
}

type output struct {
	Status      string                         `json:"status"`
	Error       string                         `json:"error,omitempty"`
	Allocations []resourceapi.AllocationResult `json:"allocations,omitempty"`
	Nodes       int64                          `json:"nodes"`
	NanosMedian int64                          `json:"nanosMedian,omitempty"`
}

type celDevice struct {
	Driver                   string                                                    `json:"driver"`
	Attributes               map[resourceapi.QualifiedName]resourceapi.DeviceAttribute `json:"attributes"`
	Capacity                 map[resourceapi.QualifiedName]resourceapi.DeviceCapacity  `json:"capacity"`
	AllowMultipleAllocations *bool                                                     `json:"allowMultipleAllocations"`
}

// evaluate gives the verdict of the scheduler's CEL on one selector and one device.
// The cache compiles without the cost estimate, which the API server's validation makes.
func evaluate(ctx context.Context, expression string, device celDevice) output {
	compiled := cel.GetCompiler(cel.Features{EnableConsumableCapacity: true}).CompileCELExpression(expression, cel.Options{})
	if compiled.Error != nil {
		return output{Status: "compile-error", Error: compiled.Error.Error()}
	}
	if compiled.MaxCost > resourceapi.CELSelectorExpressionMaxCost {
		return output{Status: "compile-error", Error: fmt.Sprintf("estimated cost %d", compiled.MaxCost)}
	}
	matches, _, err := compiled.DeviceMatches(ctx, cel.Device{
		Driver:                   device.Driver,
		AllowMultipleAllocations: device.AllowMultipleAllocations,
		Attributes:               device.Attributes,
		Capacity:                 device.Capacity,
	})
	if err != nil {
		return output{Status: "runtime-error", Error: err.Error()}
	}
	return output{Status: fmt.Sprint(matches)}
}

type classLister map[string]*resourceapi.DeviceClass

func (l classLister) List() ([]*resourceapi.DeviceClass, error) {
	var classes []*resourceapi.DeviceClass
	for _, class := range l {
		classes = append(classes, class)
	}
	return classes, nil
}

func (l classLister) Get(name string) (*resourceapi.DeviceClass, error) {
	if class, ok := l[name]; ok {
		return class, nil
	}
	return nil, errors.NewNotFound(resourceapi.Resource("deviceclasses"), name)
}

// allocatedState is what the scheduler's allocated-device cache holds
// (allocateddevices.go: admin access takes nothing; a result with a shareID is a share).
func allocatedState(claims []*resourceapi.ResourceClaim) structured.AllocatedState {
	state := structured.AllocatedState{
		AllocatedDevices:         sets.New[structured.DeviceID](),
		AllocatedSharedDeviceIDs: sets.New[structured.SharedDeviceID](),
		AggregatedCapacity:       structured.NewConsumedCapacityCollection(),
	}
	for _, claim := range claims {
		if claim.Status.Allocation == nil {
			continue
		}
		for _, result := range claim.Status.Allocation.Devices.Results {
			if ptr.Deref(result.AdminAccess, false) {
				continue
			}
			id := structured.MakeDeviceID(result.Driver, result.Pool, result.Device)
			if result.ShareID != nil {
				state.AllocatedSharedDeviceIDs.Insert(structured.MakeSharedDeviceID(id, result.ShareID))
				if result.ConsumedCapacity != nil {
					state.AggregatedCapacity.Insert(structured.NewDeviceConsumedCapacity(id, result.ConsumedCapacity))
				}
				continue
			}
			state.AllocatedDevices.Insert(id)
		}
	}
	return state
}

// setDefaults does what the API server's defaulting does to a stored claim
// (pkg/apis/resource/v1/defaults.go): the scheduler never sees an empty mode or count.
func setDefaults(claims []*resourceapi.ResourceClaim) {
	exact := func(mode *resourceapi.DeviceAllocationMode, count *int64) {
		if *mode == "" {
			*mode = resourceapi.DeviceAllocationModeExactCount
		}
		if *mode == resourceapi.DeviceAllocationModeExactCount && *count == 0 {
			*count = 1
		}
	}
	for _, claim := range claims {
		for i := range claim.Spec.Devices.Requests {
			request := &claim.Spec.Devices.Requests[i]
			if request.Exactly != nil {
				exact(&request.Exactly.AllocationMode, &request.Exactly.Count)
			}
			for j := range request.FirstAvailable {
				exact(&request.FirstAvailable[j].AllocationMode, &request.FirstAvailable[j].Count)
			}
		}
	}
}

func run(ctx context.Context, in *input, cache *cel.Cache) (output, int64) {
	classes := classLister{}
	for _, class := range in.Classes {
		classes[class.Name] = class
	}
	allocator, err := structured.NewAllocator(ctx, features, allocatedState(in.Allocated), classes, in.Slices, cache)
	if err != nil {
		return output{Status: "error", Error: err.Error()}, 0
	}
	if len(in.Nodes) == 0 {
		return allocate(ctx, in, allocator, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: in.Node.Name, Labels: in.Node.Labels}})
	}
	var out output
	var nodes int64
	for _, name := range in.Nodes {
		out, nodes = allocate(ctx, in, allocator, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}})
		if out.Status != "unschedulable" {
			break
		}
	}
	return out, nodes
}

func allocate(ctx context.Context, in *input, allocator structured.Allocator, node *v1.Node) (output, int64) {
	timeout := in.TimeoutSeconds
	if timeout <= 0 {
		timeout = 10
	}
	callCtx, cancel := context.WithTimeout(ctx, time.Duration(timeout*float64(time.Second)))
	defer cancel()
	results, err := allocator.Allocate(callCtx, node, in.Claims)
	nodes := allocateOneCalls(allocator)
	switch {
	case err != nil && callCtx.Err() != nil:
		return output{Status: "timeout", Error: err.Error(), Nodes: nodes}, nodes
	case err != nil:
		return output{Status: "error", Error: err.Error(), Nodes: nodes}, nodes
	case results == nil:
		return output{Status: "unschedulable", Nodes: nodes}, nodes
	default:
		return output{Status: "allocated", Allocations: results, Nodes: nodes}, nodes
	}
}

// allocateOneCalls reads the allocator's own statistics. Its Stats type is in an
// internal package, so it is reached by reflection.
func allocateOneCalls(allocator structured.Allocator) int64 {
	method := reflect.ValueOf(allocator).MethodByName("GetStats")
	if !method.IsValid() {
		return 0
	}
	return method.Call(nil)[0].FieldByName("NumAllocateOneInvocations").Int()
}

func main() {
	ctx := context.Background()
	cache := cel.NewCache(10, cel.Features{EnableConsumableCapacity: true})
	reader := bufio.NewReaderSize(os.Stdin, 1<<20)
	writer := bufio.NewWriter(os.Stdout)
	defer writer.Flush()
	encoder := json.NewEncoder(writer)
	for {
		line, err := reader.ReadBytes('\n')
		if len(line) > 0 {
			var in input
			var out output
			if jerr := json.Unmarshal(line, &in); jerr != nil {
				out = output{Status: "bad-input", Error: jerr.Error()}
			} else if in.CELExpression != nil {
				out = evaluate(ctx, *in.CELExpression, in.Device)
			} else {
				setDefaults(in.Claims)
				setDefaults(in.Allocated)
				if perr := patchSlices(ctx, &in); perr != nil {
					out = output{Status: "bad-input", Error: perr.Error()}
				} else {
					out, _ = run(ctx, &in, cache)
					if in.BenchIterations > 0 {
						out.NanosMedian = bench(ctx, &in, cache)
					}
				}
			}
			if eerr := encoder.Encode(out); eerr != nil {
				fmt.Fprintln(os.Stderr, eerr)
				os.Exit(1)
			}
			writer.Flush()
		}
		if err != nil {
			return
		}
	}
}

// patchSlices replaces the input's slices with what the scheduler's ResourceSlice
// tracker makes of them and the DeviceTaintRules, served from a fake clientset, sorted
// by name as the input's own order does not matter to the allocator.
func patchSlices(ctx context.Context, in *input) error {
	if len(in.TaintRules) == 0 {
		return nil
	}
	var objects []runtime.Object
	for _, slice := range in.Slices {
		objects = append(objects, slice)
	}
	for _, rule := range in.TaintRules {
		objects = append(objects, rule)
	}
	client := fake.NewClientset(objects...)
	factory := informers.NewSharedInformerFactory(client, 0)
	ctx, cancel := context.WithCancel(ctx)
	defer factory.Shutdown() // after cancel: it waits for the informers to stop
	defer cancel()
	slices, err := tracker.StartTracker(ctx, tracker.Options{
		EnableDeviceTaintRules: true,
		SliceInformer:          factory.Resource().V1().ResourceSlices(),
		TaintInformer:          factory.Resource().V1().DeviceTaintRules(),
	})
	if err != nil {
		return err
	}
	defer slices.Stop()
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	err = wait.PollUntilContextTimeout(ctx, time.Millisecond, 10*time.Second, true,
		func(context.Context) (bool, error) { return slices.HasSynced(), nil })
	if err != nil {
		return fmt.Errorf("ResourceSlice tracker not synced: %w", err)
	}
	patched, err := slices.ListPatchedResourceSlices()
	if err != nil {
		return err
	}
	if len(patched) != len(in.Slices) {
		return fmt.Errorf("ResourceSlice tracker: %d slices, %d given", len(patched), len(in.Slices))
	}
	sort.Slice(patched, func(a, b int) bool { return patched[a].Name < patched[b].Name })
	in.Slices = patched
	return nil
}

// bench times NewAllocator + Allocate, what the scheduler does per pod and node,
// in rounds of enough calls to take about a millisecond, and returns the median.
func bench(ctx context.Context, in *input, cache *cel.Cache) int64 {
	calls := 1
	for {
		start := time.Now()
		for i := 0; i < calls; i++ {
			run(ctx, in, cache)
		}
		if time.Since(start) > time.Millisecond || calls > 1<<20 {
			break
		}
		calls *= 2
	}
	samples := make([]int64, in.BenchIterations)
	for i := range samples {
		start := time.Now()
		for j := 0; j < calls; j++ {
			run(ctx, in, cache)
		}
		samples[i] = time.Since(start).Nanoseconds() / int64(calls)
	}
	sort.Slice(samples, func(a, b int) bool { return samples[a] < samples[b] })
	return samples[len(samples)/2]
}
